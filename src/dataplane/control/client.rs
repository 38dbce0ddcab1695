//! The client side of the control socket: connect, send one request, hand each answer line
//! to the caller until the end line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::proto::{Answer, Request};
use super::ControlError;

/// How a request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    Ok,
    Failed(String),
}

/// The `out` lines the appliance on `path` answers `req` with; empty when it cannot be
/// asked (the lab tools read the box's state with it, and judge what is missing).
pub fn out_lines(path: &Path, req: &Request) -> Vec<String> {
    let mut out = Vec::new();
    let _ = Client::connect(path).and_then(|c| {
        c.call(req, |a| {
            if let Answer::Out(l) = a {
                out.push(l.clone());
            }
            Ok(())
        })
    });
    out
}

/// A connection to a running appliance.
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ControlError> {
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ControlError::NotRunning {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }
            }
            std::io::ErrorKind::PermissionDenied => ControlError::Denied {
                path: path.to_path_buf(),
            },
            _ => ControlError::Io {
                what: format!("connect to {}", path.display()),
                err: e,
            },
        })?;
        Ok(Client {
            stream,
            path: path.to_path_buf(),
        })
    }

    /// Sends `req` and calls `each` with every `out`/`err` line until the end line.
    pub fn call(
        self,
        req: &Request,
        mut each: impl FnMut(&Answer) -> std::io::Result<()>,
    ) -> Result<End, ControlError> {
        let io = |what: &str| {
            let what = format!("{what} {}", self.path.display());
            move |err| ControlError::Io { what, err }
        };
        // A refusal (permission denied) may come before the request is read, and the
        // appliance closes at once: the answer is still there to read.
        let sent = (&self.stream).write_all(req.to_line().as_bytes());
        if let Err(e) = sent {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(io("send the request to")(e));
            }
        }
        let mut r = BufReader::new(&self.stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = r
                .read_until(b'\n', &mut line)
                .map_err(io("read the answer from"))?;
            if n == 0 {
                return Err(ControlError::Closed {
                    path: self.path.clone(),
                });
            }
            let text = String::from_utf8_lossy(&line);
            match Answer::parse(text.trim_end_matches('\n'))? {
                Answer::Ok => return Ok(End::Ok),
                Answer::Fail(m) => return Ok(End::Failed(m)),
                a => each(&a).map_err(|err| ControlError::Io {
                    what: "write the answer out".into(),
                    err,
                })?,
            }
        }
    }
}
