//! The handoff protocol between a node's shim and its agent: how a pod that is deleted or
//! evicted leaves a checkpoint for the pod its controller makes in its place.
//!
//! The shim cannot tell why a container is stopped (kubelet's StopContainer carries no
//! reason), and the agent cannot stop kubelet from stopping it; so the shim asks, and the agent,
//! which reads the API server, answers:
//!
//! * at the Kill of a container's main process (any signal but SIGKILL), [`Ask::Depart`]: the
//!   agent checkpoints the whole pod first if it is departing (being deleted, opted in, with a
//!   controller that replaces it), and answers once that is done or has failed;
//! * at the Create of a container that names no source, [`Ask::Arrive`]: the agent answers
//!   whether the pod takes the place of a departed one, and which (an init container that ran
//!   in the departed pod is skipped instead).
//!
//! One connection per question, on the Unix socket [`SOCKET_NAME`] in the node's work
//! directory; the question and the answer are one JSON line each. An agent that is not there
//! is no error for the pod: the shim goes on as asked (the container is killed, or created
//! fresh), as it would without podmigrate.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The agent's socket, in the node's work directory (the shim's and the agent's
/// `/var/lib/podmigrate/work`).
pub const SOCKET_NAME: &str = "handoff.sock";

/// Where the agent listens, for work directory `work_dir`.
pub fn socket_path(work_dir: &Path) -> PathBuf {
    work_dir.join(SOCKET_NAME)
}

/// What the shim asks, about the pod a container belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ask", rename_all = "snake_case")]
pub enum Ask {
    /// A container of this pod is being stopped: checkpoint the pod first if it is departing.
    Depart {
        namespace: String,
        pod: String,
        uid: String,
    },
    /// Container `container` of this pod is being created: does the pod replace a departed
    /// one?
    Arrive {
        namespace: String,
        pod: String,
        uid: String,
        container: String,
    },
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// The pod departed: its checkpoint is committed and the agent has stopped its containers
    /// (frozen, they died without running again). There is nothing left to kill.
    Departed,
    /// Go on as asked: kill, or create fresh. `why` says why no checkpoint is involved (the pod
    /// is not being deleted, did not opt in, its checkpoint failed, …).
    Proceed { why: String },
    /// Create every container from the checkpoint of the departed pod `source`, in the same
    /// namespace; its archives were made for departure `departure` (the departed pod's uid).
    Restore { source: String, departure: String },
    /// The container is an init container that ran to its end in the departed pod, whose
    /// checkpoint the pod restores: it ends at once, successfully, instead of running again.
    Skip { source: String },
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("connecting to the agent at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("asking the agent at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent at {path} answered {line:?}, which is no answer: {source}")]
    Answer {
        path: PathBuf,
        line: String,
        source: serde_json::Error,
    },
}

impl HandoffError {
    /// No agent listens (no socket, or nobody behind it): the pod goes on without podmigrate.
    pub fn no_agent(&self) -> bool {
        matches!(self, HandoffError::Connect { .. })
    }
}

/// Asks the agent behind `work_dir`'s socket, waiting at most `timeout` for the answer.
pub fn ask(work_dir: &Path, question: &Ask, timeout: Duration) -> Result<Answer, HandoffError> {
    let path = socket_path(work_dir);
    let io = |source| HandoffError::Io {
        path: path.clone(),
        source,
    };
    let mut stream = UnixStream::connect(&path).map_err(|source| HandoffError::Connect {
        path: path.clone(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let mut line = encode(question);
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(answer.trim_end()).map_err(|source| HandoffError::Answer {
        path,
        line: answer.trim_end().to_string(),
        source,
    })
}

/// One line of the protocol, without its newline.
pub fn encode<T: Serialize>(message: &T) -> String {
    serde_json::to_string(message).expect("the protocol's messages always serialize")
}

/// The question on one line the agent read.
pub fn parse_ask(line: &str) -> Result<Ask, serde_json::Error> {
    serde_json::from_str(line.trim_end())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn a_question_and_its_answer_cross_the_socket_as_one_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(socket_path(dir.path())).unwrap();
        let agent = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            let asked = parse_ask(&line).unwrap();
            let answer = Answer::Restore {
                source: "web-0".into(),
                departure: "u-1".into(),
            };
            (&stream)
                .write_all(format!("{}\n", encode(&answer)).as_bytes())
                .unwrap();
            asked
        });
        let question = Ask::Arrive {
            namespace: "shop".into(),
            pod: "web-0".into(),
            uid: "u-2".into(),
            container: "app".into(),
        };
        let answer = ask(dir.path(), &question, Duration::from_secs(5)).unwrap();
        assert_eq!(
            answer,
            Answer::Restore {
                source: "web-0".into(),
                departure: "u-1".into()
            }
        );
        assert_eq!(agent.join().unwrap(), question);
        assert!(encode(&question).starts_with(r#"{"ask":"arrive""#));
    }

    #[test]
    fn no_agent_is_told_apart_from_an_agent_that_answers_badly() {
        let dir = tempfile::tempdir().unwrap();
        let question = Ask::Depart {
            namespace: "shop".into(),
            pod: "web-0".into(),
            uid: "u".into(),
        };
        let err = ask(dir.path(), &question, Duration::from_secs(1)).unwrap_err();
        assert!(err.no_agent(), "{err}");
        assert!(err.to_string().contains("handoff.sock"), "{err}");

        let listener = UnixListener::bind(socket_path(dir.path())).unwrap();
        let agent = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"yes please\n").unwrap();
        });
        let err = ask(dir.path(), &question, Duration::from_secs(5)).unwrap_err();
        agent.join().unwrap();
        assert!(!err.no_agent());
        assert!(err.to_string().contains("yes please"), "{err}");
    }
}
