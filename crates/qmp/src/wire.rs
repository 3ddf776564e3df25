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

/// Splits a byte stream into JSON values.
#[derive(Debug, Default)]
pub struct Decoder {
    buffer: Vec<u8>,
}

/// Largest amount of unparsed input kept before it is declared malformed.
const MAX_PENDING: usize = 16 << 20;

impl Decoder {
    /// Adds bytes read from the socket.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete value, if any; malformed input is reported once and skipped
    /// up to the next line break (QEMU resynchronises the same way).
    pub fn next_message(&mut self) -> Option<Incoming> {
        let start = self.buffer.iter().position(|b| !b.is_ascii_whitespace());
        let Some(start) = start else {
            self.buffer.clear();
            return None;
        };
        self.buffer.drain(..start);
        let mut stream = serde_json::Deserializer::from_slice(&self.buffer).into_iter::<Value>();
        match stream.next()? {
            Ok(value) => {
                let used = stream.byte_offset();
                self.buffer.drain(..used);
                Some(Incoming::Value(value))
            }
            Err(e) if e.is_eof() => {
                if self.buffer.len() > MAX_PENDING {
                    self.buffer.clear();
                    return Some(Incoming::Malformed(
                        "JSON parse error, input too long".into(),
                    ));
                }
                None
            }
            Err(e) => {
                let end = self
                    .buffer
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(self.buffer.len(), |i| i + 1);
                self.buffer.drain(..end);
                Some(Incoming::Malformed(format!("JSON parse error, {e}")))
            }
        }
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
    fn output_ends_in_crlf_and_events_carry_timestamps() {
        assert_eq!(encode(&json!({"return":{}})), b"{\"return\":{}}\r\n");
        let e = event("SHUTDOWN", Some(json!({"guest": false})));
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_700_000_000);
        assert_eq!(e["data"]["guest"], false);
    }
}
