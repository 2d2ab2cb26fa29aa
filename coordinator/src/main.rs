//! `deis-backup`: the coordinator CLI. Parses options (flags, environment, TOML config), runs one
//! command from the library, prints the result, and exits with a documented code:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the command failed (the one-line error says what and what to do) |
//! | 2 | bad usage or configuration |
//! | 3 | `verify` found a damaged snapshot |
//! | 4 | another deis-backup holds the cluster lock |
//! | 5 | `restore` refused by its preflight; nothing was written |

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("deis-backup: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("deis-backup: {e}");
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
