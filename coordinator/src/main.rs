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
//! | 6 | `verify` found the snapshot whole, but its database would not recover by itself from its buckets |
//! | 7 | a `drill` check failed |
//!
//! `status` has the monitoring plugins' codes instead (0 OK, 2 CRITICAL, 3 UNKNOWN; README).
//!
//! A reader that stops reading (`deis-backup list | head`) ends the printing, not the command;
//! any other failure to write stdout turns a success into 1, after the command ran to its end.

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
        Ok(code) => match cli::stdout_failed() {
            // the command itself ran to its end; only what it printed was lost
            Some(e) => {
                eprintln!(
                    "deis-backup: the command ran, but its output could not be written to stdout ({e}); run it again with stdout on a terminal or a writable file"
                );
                if code == ExitCode::SUCCESS {
                    ExitCode::FAILURE
                } else {
                    code
                }
            }
            None => code,
        },
        Err(e) => {
            eprintln!("deis-backup: {e}");
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
