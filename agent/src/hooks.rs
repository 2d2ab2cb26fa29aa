//! Named hooks: fixed commands from the agent's configuration, run by name inside a container.
//!
//! Invariants: the caller supplies only a name; an unknown name runs nothing. A hook succeeds only
//! when its command exits 0; otherwise the error carries the tail of its combined output.

use std::collections::BTreeMap;
use std::time::Instant;

use deis_backup_proto::v1::RunHookReply;

use crate::chunks::Tail;
use crate::config::Hook;
use crate::container::{Engine, Piece};
use crate::error::{Error, Result};

/// Runs the hook `name` from `hooks`; `default_container` is used when the hook names none.
pub async fn run(
    engine: &Engine,
    hooks: &BTreeMap<String, Hook>,
    default_container: &str,
    name: &str,
) -> Result<RunHookReply> {
    let hook = hooks.get(name).ok_or_else(|| Error::NoHook {
        name: name.to_owned(),
        known: hooks.keys().cloned().collect::<Vec<_>>().join(", "),
    })?;
    if hook.command.is_empty() {
        return Err(Error::Config {
            what: format!("hook '{name}' has an empty command"),
        });
    }
    let container = hook.container.as_deref().unwrap_or(default_container);
    let start = Instant::now();
    tracing::info!(hook = name, container, "running hook");
    let mut exec = engine
        .exec(container, hook.user.as_deref(), &hook.command, false)
        .await?;
    let mut out = Tail::new(4096);
    exec.drain(|(Piece::Stdout(m) | Piece::Stderr(m))| out.push(&m))
        .await;
    let code = engine.exit_code(&exec.id, &exec.container).await?;
    if code != 0 {
        return Err(Error::CommandFailed {
            what: format!("hook '{name}'"),
            container: container.to_owned(),
            how: format!("exited with status {code}"),
            stderr: out.text(),
        });
    }
    Ok(RunHookReply {
        duration_ms: deis_backup_proto::duration_ms(start.elapsed()),
        output_tail: out.text(),
    })
}
