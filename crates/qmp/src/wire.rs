//! The QMP wire format (QEMU docs/interop/qmp-spec.rst): a stream of JSON objects in
//! each direction. Input objects need not be line-delimited; output lines end in CRLF.

use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use serde_json::Value;
use serde_json::json;

/// One thing read from a client.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    /// A complete JSON value.
    Value(Value),
    /// Bytes that are not JSON; the decoder skipped past them.
    Malformed(String),
}

/// Splits a byte stream into JSON values, looking at each byte once.
///
/// A scanner follows the value's structure as bytes arrive (brackets and braces,
/// strings and their escapes), so it knows where a value ends without parsing it;
/// serde parses each complete value exactly once. (Parsing the whole pending buffer
/// after every read made one client's long unterminated line cost quadratic time, and
/// the daemon serves every client on one thread: a 12 MiB line stalled them all for
/// more than 20 s.)
#[derive(Debug, Default)]
pub struct Decoder {
    buffer: Vec<u8>,
    /// Bytes before this index are consumed (dropped from the buffer lazily).
    consumed: usize,
    /// Where scanning resumes.
    scan: usize,
    /// Where the value being scanned begins, once one has begun.
    value_start: Option<usize>,
    /// Open brackets and braces of that value.
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// The value is a bare scalar (a number or a literal): it ends at whitespace or at
    /// the next structural character.
    scalar: bool,
    /// After malformed input: drop bytes up to the next line break (QEMU
    /// resynchronises the same way).
    skip_line: bool,
    /// Bytes examined, for tests of the one-pass rule.
    examined: u64,
}

/// Largest value kept while it is incomplete before it is declared malformed.
const MAX_PENDING: usize = 16 << 20;

/// How a scan step ended.
enum Scanned {
    /// The value ends before index `end`.
    Complete(usize),
    /// More bytes are needed.
    Incomplete,
}

impl Decoder {
    /// Adds bytes read from the socket.
    pub fn feed(&mut self, bytes: &[u8]) {
        // Drop consumed input first, once it is at least half the buffer: each byte is
        // moved at most once on average.
        if self.consumed > 0 && self.consumed >= self.buffer.len() / 2 {
            self.buffer.drain(..self.consumed);
            self.scan -= self.consumed;
            self.value_start = self.value_start.map(|s| s - self.consumed);
            self.consumed = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes the scanner has looked at so far (each fed byte at most once).
    pub fn bytes_examined(&self) -> u64 {
        self.examined
    }

    /// The next complete value, if any. Malformed input is reported once and skipped.
    pub fn next_message(&mut self) -> Option<Incoming> {
        if self.skip_line {
            let newline = self.buffer[self.scan..].iter().position(|&b| b == b'\n');
            self.examined += newline.map_or(self.buffer.len() - self.scan, |i| i + 1) as u64;
            match newline {
                Some(i) => {
                    self.scan += i + 1;
                    self.consumed = self.scan;
                    self.skip_line = false;
                }
                None => {
                    self.scan = self.buffer.len();
                    self.consumed = self.scan;
                    return None;
                }
            }
        }
        if self.value_start.is_none() {
            let rest = &self.buffer[self.scan..];
            let Some(i) = rest.iter().position(|b| !b.is_ascii_whitespace()) else {
                self.examined += rest.len() as u64;
                self.scan = self.buffer.len();
                self.consumed = self.scan;
                return None;
            };
            self.examined += i as u64;
            self.scan += i;
            self.value_start = Some(self.scan);
            self.depth = 0;
            self.in_string = false;
            self.escaped = false;
            let first = self.buffer[self.scan];
            if matches!(first, b'}' | b']') {
                // Nothing is open: not the start of any value.
                self.value_start = None;
                self.scan += 1;
                self.examined += 1;
                self.consumed = self.scan;
                self.skip_line = true;
                return Some(Incoming::Malformed(format!(
                    "JSON parse error, unexpected '{}'",
                    first as char
                )));
            }
            self.scalar = !matches!(first, b'{' | b'[' | b'"');
        }
        let start = self.value_start.expect("a value has begun");
        match self.scan_value() {
            Scanned::Complete(end) => {
                self.value_start = None;
                self.consumed = end;
                self.scan = end;
                Some(
                    match serde_json::from_slice::<Value>(&self.buffer[start..end]) {
                        Ok(value) => Incoming::Value(value),
                        Err(e) => Incoming::Malformed(format!("JSON parse error, {e}")),
                    },
                )
            }
            Scanned::Incomplete if self.scan - start > MAX_PENDING => {
                self.value_start = None;
                self.consumed = self.scan;
                self.skip_line = true;
                Some(Incoming::Malformed(
                    "JSON parse error, input too long".into(),
                ))
            }
            Scanned::Incomplete => None,
        }
    }

    /// Advances the scan through the current value.
    fn scan_value(&mut self) -> Scanned {
        while self.scan < self.buffer.len() {
            let byte = self.buffer[self.scan];
            if self.scalar
                && (byte.is_ascii_whitespace() || matches!(byte, b'{' | b'[' | b'"' | b'}' | b']'))
            {
                // The delimiter belongs to what follows (and is examined there).
                return Scanned::Complete(self.scan);
            }
            self.examined += 1;
            self.scan += 1;
            if self.scalar {
                continue;
            }
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if byte == b'\\' {
                    self.escaped = true;
                } else if byte == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        return Scanned::Complete(self.scan);
                    }
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                // A value that began with a bracket closes at depth 0, so depth is at
                // least 1 here.
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        return Scanned::Complete(self.scan);
                    }
                }
                _ => {}
            }
        }
        Scanned::Incomplete
    }
}

/// Encodes one message: compact JSON and CRLF, as QEMU writes them.
pub fn encode(message: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(message).expect("JSON values always serialise");
    out.extend_from_slice(b"\r\n");
    out
}

/// An event message with the host's realtime timestamp.
pub fn event(name: &str, data: Option<Value>) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut message = json!({
        "event": name,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
    });
    if let Some(data) = data {
        message["data"] = data;
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_objects_in_one_read_and_one_object_across_reads() {
        let mut d = Decoder::default();
        d.feed(br#"{"execute":"a"} {"execute":"b","id":1}{"exec"#);
        assert_eq!(
            d.next_message(),
            Some(Incoming::Value(json!({"execute":"a"})))
        );
        assert_eq!(
            d.next_message(),
            Some(Incoming::Value(json!({"execute":"b","id":1})))
        );
        assert_eq!(d.next_message(), None);
        d.feed(br#"ute":"c"}"#);
        assert_eq!(
            d.next_message(),
            Some(Incoming::Value(json!({"execute":"c"})))
        );
    }

    #[test]
    fn garbage_is_reported_once_and_skipped_to_the_next_line() {
        let mut d = Decoder::default();
        d.feed(b"{\"execute\": nope}\r\n{\"execute\":\"ok\"}\n");
        assert!(
            matches!(d.next_message(), Some(Incoming::Malformed(m)) if m.starts_with("JSON parse error"))
        );
        assert_eq!(
            d.next_message(),
            Some(Incoming::Value(json!({"execute":"ok"})))
        );
    }

    #[test]
    fn strings_hold_brackets_and_escaped_quotes() {
        let mut d = Decoder::default();
        d.feed(br#"{"execute":"a}\"{[","id":"]"} "lone" 42 {"#);
        assert_eq!(
            d.next_message(),
            Some(Incoming::Value(json!({"execute":"a}\"{[","id":"]"})))
        );
        assert_eq!(d.next_message(), Some(Incoming::Value(json!("lone"))));
        assert_eq!(d.next_message(), Some(Incoming::Value(json!(42))));
        assert_eq!(d.next_message(), None);
        d.feed(br#""execute":"b"}"#);
        assert_eq!(
            d.next_message(),
            Some(Incoming::Value(json!({"execute":"b"})))
        );
    }

    #[test]
    fn a_stray_closing_bracket_is_reported_and_the_line_skipped() {
        let mut d = Decoder::default();
        d.feed(b"} {\"x\": 1}\n{\"execute\":\"ok\"}");
        assert!(matches!(d.next_message(), Some(Incoming::Malformed(m)) if m.contains("'}'")));
        assert_eq!(
            d.next_message(),
            Some(Incoming::Value(json!({"execute":"ok"})))
        );
    }

    #[test]
    fn a_long_unterminated_line_is_scanned_once_then_refused_and_skipped() {
        let mut d = Decoder::default();
        d.feed(b"{\"execute\": \"");
        let piece = vec![b'x'; 64 << 10];
        let mut fed = 13u64;
        let mut refused = 0;
        // 20 MiB in 64 KiB reads, as the socket delivers them.
        for _ in 0..320 {
            d.feed(&piece);
            fed += piece.len() as u64;
            while let Some(m) = d.next_message() {
                assert!(matches!(m, Incoming::Malformed(ref t) if t.contains("too long")));
                refused += 1;
            }
        }
        assert_eq!(refused, 1, "reported once");
        assert_eq!(d.bytes_examined(), fed, "every byte examined exactly once");
        // The rest of the line is dropped; the next line is a command again.
        d.feed(b"xx\"}\n{\"execute\":\"query-version\"}");
        assert_eq!(
            d.next_message(),
            Some(Incoming::Value(json!({"execute":"query-version"})))
        );
        assert!(d.buffer.len() < 1 << 20, "consumed input is dropped");
    }

    #[test]
    fn many_small_messages_in_one_read_are_linear() {
        let mut d = Decoder::default();
        let one = br#"{"execute":"query-version"}"#;
        let mut input = Vec::new();
        for _ in 0..100_000 {
            input.extend_from_slice(one);
        }
        d.feed(&input);
        let mut n = 0;
        while let Some(Incoming::Value(_)) = d.next_message() {
            n += 1;
        }
        assert_eq!(n, 100_000);
        assert_eq!(d.bytes_examined(), input.len() as u64);
    }

    #[test]
    fn output_ends_in_crlf_and_events_carry_timestamps() {
        assert_eq!(encode(&json!({"return":{}})), b"{\"return\":{}}\r\n");
        let e = event("SHUTDOWN", Some(json!({"guest": false})));
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_700_000_000);
        assert_eq!(e["data"]["guest"], false);
    }
}
