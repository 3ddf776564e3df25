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
/// strings and their escapes, number and keyword tokens), so it knows where a value
/// ends without parsing it; serde parses each complete value exactly once. (Parsing the
/// whole pending buffer after every read made one client's long unterminated line cost
/// quadratic time, and the daemon serves every client on one thread: a 12 MiB line
/// stalled them all for more than 20 s.)
///
/// Errors follow QEMU's JSON streamer, so a client gets the error replies QEMU's would:
/// a complete value that does not parse (`{"execute": nope}`: `nope` is a keyword
/// token, wrong only to the parser) is one error; a byte no token can hold, or a
/// malformed number (`-v`), is one error for the value it broke, which is dropped, and
/// then input is skipped up to the next structural character or control character (a
/// line break), where scanning starts again; a closing bracket with nothing open is
/// one error of its own.
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
    /// The previous byte was a minus sign outside a string: a digit must follow.
    after_minus: bool,
    /// The value is a bare scalar (a number or a keyword): it ends at whitespace or at
    /// the next structural character.
    scalar: bool,
    /// After a lexical error: skipping to a point where scanning can start again.
    recovering: bool,
    /// Bytes examined, for tests of the one-pass rule.
    examined: u64,
}

/// Largest value kept while it is incomplete before it is declared malformed.
const MAX_PENDING: usize = 16 << 20;

/// How a scan step ended.
enum Scanned {
    /// The value ends before index `end`.
    Complete(usize),
    /// A byte no JSON token can hold (or that breaks a number), outside a string: the
    /// value is broken.
    Invalid(u8),
    /// More bytes are needed.
    Incomplete,
}

/// Bytes where scanning starts again after a lexical error (QEMU's resynchronisation
/// points): structure, and control characters but the tab.
fn ends_recovery(byte: u8) -> bool {
    matches!(byte, b'{' | b'}' | b'[' | b']' | b':' | b',')
        || (byte < 0x20 && byte != b'\t')
        || byte >= 0xfe
}

/// Whether `byte` can be part of a token outside a string: whitespace, structure,
/// numbers and keywords (lowercase letters; serde tells `true` from `nope` later).
fn may_appear_outside_strings(byte: u8) -> bool {
    byte.is_ascii_whitespace()
        || byte.is_ascii_digit()
        || byte.is_ascii_lowercase()
        || matches!(
            byte,
            b'{' | b'}' | b'[' | b']' | b':' | b',' | b'"' | b'-' | b'+' | b'.' | b'E'
        )
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

    /// Drops the value being scanned, and everything up to the next point where
    /// scanning can start again.
    fn start_recovery(&mut self) {
        self.value_start = None;
        self.consumed = self.scan;
        self.recovering = true;
    }

    /// The next complete value, if any. Malformed input is reported (see the type's
    /// note) and skipped.
    pub fn next_message(&mut self) -> Option<Incoming> {
        if self.recovering {
            let rest = &self.buffer[self.scan..];
            match rest.iter().position(|&b| ends_recovery(b)) {
                Some(i) => {
                    self.examined += i as u64;
                    self.scan += i;
                    self.consumed = self.scan;
                    self.recovering = false;
                }
                None => {
                    self.examined += rest.len() as u64;
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
            let first = self.buffer[self.scan];
            if matches!(first, b'}' | b']') {
                // Nothing is open: one error for this byte, then go on after it.
                self.scan += 1;
                self.examined += 1;
                self.consumed = self.scan;
                return Some(Incoming::Malformed(format!(
                    "JSON parse error, unexpected '{}'",
                    first as char
                )));
            }
            self.value_start = Some(self.scan);
            self.depth = 0;
            self.in_string = false;
            self.escaped = false;
            self.after_minus = false;
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
            Scanned::Invalid(byte) => {
                self.start_recovery();
                Some(Incoming::Malformed(format!(
                    "JSON parse error, invalid character '{}'",
                    byte.escape_ascii()
                )))
            }
            Scanned::Incomplete if self.scan - start > MAX_PENDING => {
                self.start_recovery();
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
            if self.in_string {
                self.examined += 1;
                self.scan += 1;
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
            if self.after_minus {
                self.after_minus = false;
                if !byte.is_ascii_digit() {
                    // Consumed with the broken value.
                    self.examined += 1;
                    self.scan += 1;
                    return Scanned::Invalid(byte);
                }
            }
            if self.scalar
                && (byte.is_ascii_whitespace() || matches!(byte, b'{' | b'[' | b'"' | b'}' | b']'))
            {
                // The delimiter belongs to what follows (and is examined there).
                return Scanned::Complete(self.scan);
            }
            self.examined += 1;
            self.scan += 1;
            if !may_appear_outside_strings(byte) {
                return Scanned::Invalid(byte);
            }
            match byte {
                b'-' => self.after_minus = true,
                _ if self.scalar => {}
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
    fn a_stray_closing_bracket_is_one_error_and_scanning_goes_on_after_it() {
        let mut d = Decoder::default();
        d.feed(b"} {\"x\": 1}\n{\"execute\":\"ok\"}");
        assert!(matches!(d.next_message(), Some(Incoming::Malformed(m)) if m.contains("'}'")));
        assert_eq!(d.next_message(), Some(Incoming::Value(json!({"x": 1}))));
        assert_eq!(
            d.next_message(),
            Some(Incoming::Value(json!({"execute":"ok"})))
        );
    }

    #[test]
    fn errors_are_reported_as_qemus_streamer_reports_them() {
        let errors = |input: &[u8]| {
            let mut d = Decoder::default();
            d.feed(input);
            let mut kinds = Vec::new();
            while let Some(m) = d.next_message() {
                kinds.push(matches!(m, Incoming::Value(_)));
            }
            kinds
        };
        // A bad keyword spread over lines: the value completes, then fails once.
        assert_eq!(
            errors(b"{\"execute\": \"a\",\n \"arguments\": {\"x\": nope},\n \"id\": 1}\n{}"),
            [false, true]
        );
        // A lexical error drops the unterminated value around it; input is skipped to
        // the next structural character (the `}`, one error of its own).
        assert_eq!(
            errors(b"{\"execute\": \"a\",\n \"id\": 1\n{\"execute\": query-version}\n{\"ok\":1}\n"),
            [false, false, true]
        );
        // Characters no token holds, outside strings.
        assert_eq!(errors(b"{\"a\": #}\n{}"), [false, false, true]);
        assert_eq!(errors(b"{\"a\": \"#-Q\"}"), [true]);
    }

    #[test]
    fn a_long_unterminated_value_is_scanned_once_then_refused_and_skipped() {
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
        // The rest is skipped up to the next structural character; the `}` closing
        // the dropped value is an error of its own (as in QEMU), then commands parse.
        d.feed(b"xx\"}\n{\"execute\":\"query-version\"}");
        assert!(matches!(d.next_message(), Some(Incoming::Malformed(m)) if m.contains("'}'")));
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
