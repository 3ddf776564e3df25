//! QMP connections: greeting, capabilities negotiation, commands, events.
//!
//! Every client gets the greeting at once and may only run `qmp_capabilities` until it
//! has; then commands run one at a time per connection, in order, replies echo the
//! `id`, and every event of the daemon goes to every negotiated client. Input that is
//! not JSON, not an object, or not a well-formed command is answered with an error and
//! the connection goes on.

use std::sync::Arc;

use serde_json::Value;
use serde_json::json;
use tokio::io::AsyncRead;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast;

use crate::daemon::Daemon;
use crate::daemon::version;
use crate::error::QmpError;
use crate::wire::Decoder;
use crate::wire::Incoming;
use crate::wire::encode;

/// Serves QMP clients from a UNIX listener until the task is dropped.
pub async fn serve_unix(daemon: Arc<Daemon>, listener: tokio::net::UnixListener) {
    let mut backoff = nbd::listener::AcceptBackoff::default();
    loop {
        let stream = nbd::listener::accept_unix(&listener, "QMP", &mut backoff).await;
        tokio::spawn(serve_connection(daemon.clone(), stream));
    }
}

fn error_reply(error: &QmpError, id: Option<&Value>) -> Value {
    let mut reply = json!({"error": {"class": error.class, "desc": error.desc}});
    if let Some(id) = id {
        reply["id"] = id.clone();
    }
    reply
}

/// A command message taken apart: name, arguments, id.
type Command = (String, Value, Option<Value>);

/// Checks the shape of a command message.
fn parse_command(message: Value) -> Result<Command, (QmpError, Option<Value>)> {
    let Value::Object(mut map) = message else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = map.remove("id");
    let fail = |desc: String, id: &Option<Value>| Err((QmpError::generic(desc), id.clone()));
    if map.contains_key("exec-oob") {
        return fail("QMP input member 'exec-oob' is unexpected".into(), &id);
    }
    let name = match map.remove("execute") {
        Some(Value::String(name)) => name,
        Some(_) => return fail("QMP input member 'execute' must be a string".into(), &id),
        None => return fail("QMP input lacks member 'execute'".into(), &id),
    };
    let arguments = match map.remove("arguments") {
        None => Value::Object(Default::default()),
        Some(args @ Value::Object(_)) => args,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into(), &id),
    };
    if let Some(key) = map.keys().next() {
        return fail(format!("QMP input member '{key}' is unexpected"), &id);
    }
    Ok((name, arguments, id))
}

/// What one connection has negotiated.
#[derive(Debug, Default)]
pub struct Session {
    /// `qmp_capabilities` succeeded: commands run and events flow.
    pub negotiated: bool,
}

/// The reply to one decoded message of a client (an error for malformed input, for a
/// command before negotiation, or from the command itself).
pub async fn respond(daemon: &Arc<Daemon>, session: &mut Session, incoming: Incoming) -> Value {
    let message = match incoming {
        Incoming::Malformed(desc) => return error_reply(&QmpError::generic(desc), None),
        Incoming::Value(message) => message,
    };
    let (name, arguments, id) = match parse_command(message) {
        Err((error, id)) => return error_reply(&error, id.as_ref()),
        Ok(command) => command,
    };
    let result = if !session.negotiated {
        if name == "qmp_capabilities" {
            capabilities(arguments).map(|()| {
                session.negotiated = true;
                json!({})
            })
        } else {
            Err(QmpError {
                class: "CommandNotFound",
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            })
        }
    } else {
        daemon.execute(&name, arguments).await
    };
    match result {
        Ok(value) => {
            let mut reply = json!({"return": value});
            if let Some(id) = id {
                reply["id"] = id;
            }
            reply
        }
        Err(error) => error_reply(&error, id.as_ref()),
    }
}

/// Serves one client until it disconnects.
pub async fn serve_connection<S>(daemon: Arc<Daemon>, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let greeting = json!({"QMP": {"version": version(), "capabilities": []}});
    if writer.write_all(&encode(&greeting)).await.is_err() {
        return;
    }
    let mut events: Option<broadcast::Receiver<Value>> = None;
    let mut session = Session::default();
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        while let Some(incoming) = decoder.next_message() {
            let reply = respond(&daemon, &mut session, incoming).await;
            if session.negotiated && events.is_none() {
                events = Some(daemon.subscribe());
            }
            if writer.write_all(&encode(&reply)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => decoder.feed(&buf[..n]),
            },
            event = async {
                match events.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => match event {
                Ok(message) => {
                    if writer.write_all(&encode(&message)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => tracing::warn!("a QMP client missed {n} events"),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

fn capabilities(arguments: Value) -> Result<(), QmpError> {
    let mut m = block::qapi::Members::new(
        match arguments {
            Value::Object(map) => map,
            _ => Default::default(),
        },
        String::new(),
    );
    let enable = m.optional("enable", |m, k, v| match v {
        Value::Array(items) => Ok(items),
        _ => Err(m.type_error(k, "array")),
    })?;
    m.finish()?;
    if let Some(capability) = enable.unwrap_or_default().first() {
        let name = capability.as_str().unwrap_or("?");
        return Err(QmpError::generic(format!(
            "Capability '{name}' not available"
        )));
    }
    Ok(())
}
