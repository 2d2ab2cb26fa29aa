//! The Docker engine as the agent uses it: connect and negotiate the API version, look containers
//! up by name, run fixed commands in them with `exec`, and run the drill's throwaway containers.
//!
//! Invariants:
//! - The only containers the agent creates are throwaway ones ([`Throwaway`]): no network, no
//!   mount, labelled as the agent's, and only ever removed by that label or by the name it gave.
//! - Commands are never run through a shell; their argv comes from the agent's code or config.
//! - Running as a user needs Engine API ≥ 1.19 (`User` on exec); below that the command is wrapped
//!   as `sudo -u <user> …`, as the Deis v1 docs do.
//! - An exec's result is its exit code from exec inspect once the process has ended; a container
//!   or exec that vanished is an error, never success.

use std::pin::Pin;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::ListContainersOptions;
use futures::Stream;
use tokio::io::AsyncWrite;

use crate::error::{Error, Result};

/// Engine API version from which `exec` takes a `User`.
const EXEC_USER_API: (usize, usize) = (1, 19);

/// What Describe reports about a container.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    pub name: String,
    pub running: bool,
    pub image: String,
}

/// A container the agent creates for a job and removes afterwards: from `image` (an image id),
/// running `entrypoint` as `user`, with no network and no mount, labelled `label`.
#[derive(Debug, Clone)]
pub struct Throwaway {
    pub name: String,
    pub image: String,
    pub entrypoint: Vec<String>,
    pub user: String,
    pub label: (String, String),
}

/// A connection to the local Docker engine, version negotiated.
#[derive(Debug, Clone)]
pub struct Engine {
    docker: Docker,
    socket: String,
}

/// A started exec: its output stream and, when asked for, its stdin.
pub struct Exec {
    pub id: String,
    pub container: String,
    pub output: Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>,
    pub input: Pin<Box<dyn AsyncWrite + Send>>,
}

/// One piece of a command's output; a TTY's console counts as stdout.
#[derive(Debug)]
pub enum Piece {
    Stdout(bytes::Bytes),
    Stderr(bytes::Bytes),
}

impl Exec {
    /// The command's output, piece by piece, in order, to its end or the error that cut it short:
    /// the one reading of an exec's output.
    pub fn pieces(
        &mut self,
    ) -> impl Stream<Item = Result<Piece, bollard::errors::Error>> + Send + '_ {
        use futures::StreamExt as _;
        self.output.as_mut().filter_map(async |item| match item {
            Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                Some(Ok(Piece::Stdout(message)))
            }
            Ok(LogOutput::StdErr { message }) => Some(Ok(Piece::Stderr(message))),
            Ok(LogOutput::StdIn { .. }) => None,
            Err(e) => Some(Err(e)),
        })
    }

    /// Reads the command's output to its end, handing each piece to `each`; stops at an error
    /// that cuts it short (the exit code then tells what happened).
    pub async fn drain(&mut self, mut each: impl FnMut(Piece)) {
        use futures::StreamExt as _;
        let mut pieces = std::pin::pin!(self.pieces());
        while let Some(Ok(piece)) = pieces.next().await {
            each(piece);
        }
    }
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The exec's `User` and argv: the user as given where the engine takes one, else a
/// `sudo -u <user>` prefix (Engine API < 1.19).
fn command_for(
    exec_as_user: bool,
    user: Option<&str>,
    argv: &[String],
) -> (Option<String>, Vec<String>) {
    match user {
        Some(u) if !exec_as_user => (
            None,
            ["sudo", "-u", u]
                .into_iter()
                .map(String::from)
                .chain(argv.iter().cloned())
                .collect(),
        ),
        u => (u.map(String::from), argv.to_vec()),
    }
}

impl Engine {
    /// Connects to the engine at `socket` (`unix:///path` or a path) and negotiates the API version.
    pub async fn connect(socket: &str) -> Result<Self> {
        let err = |source| Error::Docker {
            socket: socket.to_owned(),
            source,
        };
        let path = socket.strip_prefix("unix://").unwrap_or(socket);
        if socket.contains("://") && !socket.starts_with("unix://") {
            return Err(Error::Config {
                what: format!(
                    "Docker address '{socket}' is not a unix socket (unix:///var/run/docker.sock)"
                ),
            });
        }
        let docker = Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION)
            .map_err(err)?
            .negotiate_version()
            .await
            .map_err(err)?;
        Ok(Self {
            docker,
            socket: socket.to_owned(),
        })
    }

    /// The negotiated Engine API version, e.g. `1.43`.
    pub fn api_version(&self) -> String {
        self.docker.client_version().to_string()
    }

    fn can_exec_as_user(&self) -> bool {
        let v = self.docker.client_version();
        (v.major_version, v.minor_version) >= EXEC_USER_API
    }

    /// The container named `name`, or `None` when there is none.
    pub async fn container(&self, name: &str) -> Result<Option<ContainerInfo>> {
        match self.docker.inspect_container(name, None).await {
            Ok(c) => Ok(Some(ContainerInfo {
                name: name.to_owned(),
                running: c.state.and_then(|s| s.running).unwrap_or(false),
                image: c.config.and_then(|c| c.image).unwrap_or_default(),
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(source) => Err(Error::Docker {
                socket: self.socket.clone(),
                source,
            }),
        }
    }

    /// The image id (`sha256:…`) the container named `name` runs.
    pub async fn image_of(&self, name: &str) -> Result<String> {
        match self.docker.inspect_container(name, None).await {
            Ok(c) => c.image.ok_or_else(|| Error::Internal {
                what: format!("Docker reports no image for container '{name}'"),
            }),
            Err(e) if is_not_found(&e) => Err(Error::NoContainer {
                name: name.to_owned(),
            }),
            Err(source) => Err(self.docker_error(source)),
        }
    }

    fn docker_error(&self, source: bollard::errors::Error) -> Error {
        Error::Docker {
            socket: self.socket.clone(),
            source,
        }
    }

    /// Creates and starts `t`.
    pub async fn run_throwaway(&self, t: &Throwaway) -> Result<()> {
        use bollard::models::{ContainerCreateBody, HostConfig};
        use bollard::query_parameters::CreateContainerOptions;
        let body = ContainerCreateBody {
            image: Some(t.image.clone()),
            entrypoint: Some(t.entrypoint.clone()),
            cmd: Some(Vec::new()),
            user: Some(t.user.clone()),
            network_disabled: Some(true),
            labels: Some([t.label.clone()].into_iter().collect()),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        };
        let options = CreateContainerOptions {
            name: Some(t.name.clone()),
            ..CreateContainerOptions::default()
        };
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| self.docker_error(e))?;
        self.docker
            .start_container(&t.name, None)
            .await
            .map_err(|e| self.docker_error(e))
    }

    /// Removes the container `name` (and its volumes), running or not; gone already is fine.
    pub async fn remove(&self, name: &str) -> Result<()> {
        use bollard::query_parameters::RemoveContainerOptions;
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..RemoveContainerOptions::default()
        };
        match self.docker.remove_container(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.docker_error(e)),
        }
    }

    /// Removes every container labelled `key=value` (running or not); returns their names.
    pub async fn remove_labelled(&self, key: &str, value: &str) -> Result<Vec<String>> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(
                [("label".to_owned(), vec![format!("{key}={value}")])]
                    .into_iter()
                    .collect(),
            ),
            ..ListContainersOptions::default()
        };
        let list = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| self.docker_error(e))?;
        let mut removed = Vec::new();
        for c in list {
            // Checked again here: the filter is the engine's, the promise is ours.
            if c.labels
                .as_ref()
                .and_then(|l| l.get(key))
                .map(String::as_str)
                != Some(value)
            {
                continue;
            }
            let Some(id) = c.id else { continue };
            self.remove(&id).await?;
            removed.extend(
                c.names
                    .unwrap_or_default()
                    .into_iter()
                    .map(|n| n.trim_start_matches('/').to_owned()),
            );
        }
        Ok(removed)
    }

    /// Fails unless `name` exists and runs.
    pub async fn require_running(&self, name: &str) -> Result<()> {
        match self.container(name).await? {
            None => Err(Error::NoContainer {
                name: name.to_owned(),
            }),
            Some(c) if !c.running => Err(Error::NotRunning {
                name: name.to_owned(),
            }),
            Some(_) => Ok(()),
        }
    }

    /// Names of the `watched` containers that run on this host, sorted.
    pub async fn platform_containers(&self, watched: &[String]) -> Result<Vec<String>> {
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions::default()))
            .await
            .map_err(|source| Error::Docker {
                socket: self.socket.clone(),
                source,
            })?;
        let mut names: Vec<String> = list
            .into_iter()
            .flat_map(|c| c.names.unwrap_or_default())
            .map(|n| n.trim_start_matches('/').to_owned())
            .filter(|n| watched.contains(n))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Starts `argv` in `container` as `user`, with stdin attached when `stdin` is set.
    pub async fn exec(
        &self,
        container: &str,
        user: Option<&str>,
        argv: &[String],
        stdin: bool,
    ) -> Result<Exec> {
        self.require_running(container).await?;
        let exec_err = |op, source| Error::Exec {
            op,
            container: container.to_owned(),
            source,
        };
        let (user, cmd) = command_for(self.can_exec_as_user(), user, argv);
        let created = self
            .docker
            .create_exec(
                container,
                CreateExecOptions {
                    attach_stdin: Some(stdin),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(false),
                    user,
                    cmd: Some(cmd),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                if is_not_found(&e) {
                    Error::NoContainer {
                        name: container.to_owned(),
                    }
                } else {
                    exec_err("create an exec", e)
                }
            })?;
        let started = self
            .docker
            .start_exec(
                &created.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: Some(64 * 1024),
                }),
            )
            .await
            .map_err(|e| exec_err("start the exec", e))?;
        match started {
            StartExecResults::Attached { output, input } => Ok(Exec {
                id: created.id,
                container: container.to_owned(),
                output,
                input,
            }),
            StartExecResults::Detached => Err(Error::Internal {
                what: "Docker started the exec detached though it was asked to attach".into(),
            }),
        }
    }

    /// The exit code of a finished exec; waits briefly for the engine to notice the end.
    pub async fn exit_code(&self, exec_id: &str, container: &str) -> Result<i64> {
        for attempt in 0..200u64 {
            let info = self.docker.inspect_exec(exec_id).await.map_err(|e| {
                if is_not_found(&e) {
                    Error::NoContainer {
                        name: container.to_owned(),
                    }
                } else {
                    Error::Exec {
                        op: "inspect the exec",
                        container: container.to_owned(),
                        source: e,
                    }
                }
            })?;
            if info.running != Some(true) {
                return info.exit_code.ok_or_else(|| Error::NotRunning {
                    name: container.to_owned(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5 * attempt.min(10))).await;
        }
        Err(Error::Internal {
            what: format!("the exec in '{container}' still runs after its output ended"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_engines_get_sudo() {
        let argv = vec!["pg_dumpall".to_owned()];
        assert_eq!(
            command_for(true, Some("postgres"), &argv),
            (Some("postgres".into()), argv.clone())
        );
        assert_eq!(
            command_for(false, Some("postgres"), &argv),
            (
                None,
                ["sudo", "-u", "postgres", "pg_dumpall"]
                    .map(String::from)
                    .to_vec()
            )
        );
        assert_eq!(command_for(false, None, &argv), (None, argv.clone()));
    }
}
