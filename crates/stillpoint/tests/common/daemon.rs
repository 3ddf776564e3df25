//! A `stillpoint daemon` child process and a QMP client for it.

use std::io::BufRead;
use std::io::BufReader;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use serde_json::json;

pub struct DaemonProcess(pub Child);

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub events: Vec<Value>,
}

impl Qmp {
    pub fn connect(path: &Path) -> (Qmp, Value) {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = qmp.read();
        (qmp, greeting)
    }

    pub fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with("\r\n"), "QMP lines end in CRLF: {line:?}");
        serde_json::from_str(&line).unwrap()
    }

    pub fn send_raw(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    /// Sends a command and returns its reply, collecting events on the way.
    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        self.send_raw(&format!(
            "{}\n",
            json!({"execute": name, "arguments": args, "id": name})
        ));
        self.reply()
    }

    pub fn reply(&mut self) -> Value {
        loop {
            let message = self.read();
            if message.get("event").is_some() {
                self.events.push(message);
            } else {
                return message;
            }
        }
    }

    /// Reads events until `name` arrives (or returns it if already seen).
    pub fn wait_event(&mut self, name: &str) -> Value {
        if let Some(e) = self.events.iter().find(|e| e["event"] == name) {
            return e.clone();
        }
        loop {
            let message = self.read();
            assert!(message.get("event").is_some(), "unexpected {message}");
            self.events.push(message.clone());
            if message["event"] == name {
                return message;
            }
        }
    }

    /// The job's status changes and block-job events, in order.
    pub fn job_history(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| match e["event"].as_str().unwrap() {
                "JOB_STATUS_CHANGE" => e["data"]["status"].as_str().unwrap().to_string(),
                other => other.to_string(),
            })
            .collect()
    }
}

pub fn start(dir: &Path, extra: &[String]) -> (DaemonProcess, std::path::PathBuf) {
    let qmp = dir.join("qmp.sock");
    let mut args = vec![
        "daemon".to_string(),
        "--qmp".into(),
        qmp.display().to_string(),
    ];
    args.extend_from_slice(extra);
    let child = Command::new(env!("CARGO_BIN_EXE_stillpoint"))
        .args(&args)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let process = DaemonProcess(child);
    for _ in 0..500 {
        if qmp.exists() {
            return (process, qmp);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the daemon did not create its QMP socket");
}
