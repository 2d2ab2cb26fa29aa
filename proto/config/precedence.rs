//! The precedence test both binaries run on every option of every options struct: a flag wins
//! over its environment variable, the variable over the config file, the file over the default.
//!
//! Owns: [`Section`] (one options struct with one [`Case`] per option) and its [`Section::check`].
//! Invariants:
//! - Every clap argument of the struct and every key its file section accepts has a case, and no
//!   case names one that is gone: an option added without a case fails the test.
//! - A case's samples are told apart by the test itself (the flag's, the variable's, the file's
//!   and the default's effective values differ), so a source that is ignored shows.
//! - The test process never sets an environment variable (that would race the other tests):
//!   it runs itself again as two child processes with environments of its choosing, one with every
//!   option's variable set and one with none of them, and checks they ran the test.

use std::collections::BTreeMap;
use std::process::Command;

use serde::de::DeserializeOwned;

/// Marks a child process, and which environment it has.
const CHILD: &str = "DEIS_BACKUP_PRECEDENCE_CHILD";

/// One option: a sample from each source and the effective value each gives.
pub struct Case<T> {
    /// Its key in the file section.
    pub key: &'static str,
    /// Its clap id; `None` for an option only the file sets (`#[arg(skip)]`).
    pub id: Option<&'static str>,
    /// The value given after its flag; `None` for a switch (`--full`), which takes none and which
    /// the file turns on with `true`.
    pub flag: Option<&'static str>,
    /// The value of its environment variable, for an option that has one.
    pub env: Option<&'static str>,
    /// The value in the file, as TOML.
    pub file: &'static str,
    /// The effective value (as `get` shows it) from: the flag, the variable, the file, nothing.
    pub want: [&'static str; 4],
    /// The effective value, read as the program reads it (through the accessor that applies the
    /// default).
    pub get: fn(&T) -> String,
}

impl<T> Case<T> {
    /// An option with a value: `key`, its clap id, the samples for the flag, the environment
    /// (when it has a variable) and the file (TOML), and what each gives, then the default.
    pub fn opt(
        key: &'static str,
        id: &'static str,
        samples: (&'static str, Option<&'static str>, &'static str),
        want: [&'static str; 4],
        get: fn(&T) -> String,
    ) -> Self {
        Self {
            key,
            id: Some(id),
            flag: Some(samples.0),
            env: samples.1,
            file: samples.2,
            want,
            get,
        }
    }

    /// A switch (`--full`, `--no-register`): off unless the flag or the file turns it on.
    pub fn switch(key: &'static str, id: &'static str, get: fn(&T) -> String) -> Self {
        Self {
            key,
            id: Some(id),
            flag: None,
            env: None,
            file: "true",
            want: ["true", "", "true", "false"],
            get,
        }
    }

    /// An option only the file sets (`#[arg(skip)]`).
    pub fn file_only(
        key: &'static str,
        file: &'static str,
        want: &'static str,
        get: fn(&T) -> String,
    ) -> Self {
        Self {
            key,
            id: None,
            flag: None,
            env: None,
            file,
            want: ["", "", want, ""],
            get,
        }
    }
}

/// Resolves the options as the program does: the command line (after the program and its
/// subcommand) and the section's TOML body.
pub type Resolve<'a, T> = &'a dyn Fn(&[String], &str) -> Result<T, String>;

/// One options struct and its cases.
pub struct Section<'a, T> {
    /// The section's name, for messages.
    pub name: &'a str,
    /// The struct's clap arguments (`T::augment_args(Command::new("t"))`).
    pub command: clap::Command,
    /// The keys the file section accepts ([`serde_keys`]).
    pub keys: Vec<String>,
    /// Clap ids of per-run decisions the file must refuse (`--dry-run`, `--force`).
    pub refused: &'a [&'a str],
    pub cases: Vec<Case<T>>,
    pub resolve: Resolve<'a, T>,
    /// Environment both child processes get (what a default reads, e.g. the host's address).
    pub base_env: &'a [(&'a str, &'a str)],
}

/// The keys a struct's `Deserialize` accepts, from the message serde gives for an unknown one
/// ("unknown field `x`, expected one of `a`, `b`").
pub fn serde_keys<T: DeserializeOwned>() -> Vec<String> {
    let e = toml::from_str::<T>("zz-no-such-key = 0")
        .err()
        .expect("unknown keys are refused");
    let message = e.message();
    let Some((_, expected)) = message.split_once("expected") else {
        return Vec::new(); // "there are no fields"
    };
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

impl<T> Section<'_, T> {
    /// Runs the test; `module` is the caller's `module_path!()` and `test` its function's name.
    pub fn check(&self, module: &str, test: &str) {
        match std::env::var(CHILD).as_deref() {
            Ok("plain") => self.without_env(),
            Ok("env") => self.with_env(),
            _ => {
                self.check_cases();
                let name = match module.split_once("::") {
                    Some((_, path)) => format!("{path}::{test}"),
                    None => test.to_owned(),
                };
                self.spawn(&name, "plain", &[]);
                self.spawn(&name, "env", &self.env_vars());
            }
        }
    }

    fn arg(&self, id: &str) -> &clap::Arg {
        self.command
            .get_arguments()
            .find(|a| a.get_id() == id)
            .unwrap_or_else(|| panic!("[{}] {id}: no such option", self.name))
    }

    /// What the test itself can check: every option has a case, and each case can fail.
    fn check_cases(&self) {
        let name = self.name;
        for arg in self.command.get_arguments() {
            let id = arg.get_id().as_str();
            let covered = self.cases.iter().any(|c| c.id == Some(id));
            if self.refused.contains(&id) {
                assert!(!covered, "[{name}] {id} is refused in the file: no case");
                let file = format!("{} = true", id.replace('_', "-"));
                assert!(
                    (self.resolve)(&[], &file).is_err(),
                    "[{name}] the file sets {id}"
                );
            } else {
                assert!(covered, "[{name}] option {id} has no precedence case");
            }
        }
        for key in &self.keys {
            assert!(
                self.cases.iter().any(|c| c.key == key),
                "[{name}] file key {key} has no precedence case"
            );
        }
        for c in &self.cases {
            let what = format!("[{name}] {}", c.key);
            assert!(
                self.keys.iter().any(|k| k == c.key),
                "{what}: not a file key"
            );
            let [flag, env, file, default] = c.want;
            assert_ne!(file, default, "{what}: the file's value is the default");
            let Some(id) = c.id else {
                assert!(c.flag.is_none() && c.env.is_none(), "{what}: the file only");
                continue;
            };
            let arg = self.arg(id);
            let switch = !arg.get_action().takes_values();
            assert_eq!(c.flag.is_none(), switch, "{what}: a switch takes no value");
            if !switch {
                assert_ne!(flag, file, "{what}: the flag's value is the file's");
            }
            assert_eq!(
                c.env.is_some(),
                arg.get_env().is_some(),
                "{what}: an environment sample iff the option has a variable"
            );
            if c.env.is_some() {
                assert!(env != flag && env != file, "{what}: samples not apart");
            }
        }
    }

    /// Every case's variable, set to its sample.
    fn env_vars(&self) -> Vec<(String, String)> {
        let mut vars = BTreeMap::new();
        for c in &self.cases {
            let (Some(id), Some(value)) = (c.id, c.env) else {
                continue;
            };
            let var = self.arg(id).get_env().expect("checked").to_string_lossy();
            let old = vars.insert(var.to_string(), value.to_owned());
            assert!(old.is_none(), "[{}] {var} serves two options", self.name);
        }
        vars.into_iter().collect()
    }

    fn spawn(&self, test: &str, mode: &str, vars: &[(String, String)]) {
        let exe = std::env::current_exe().expect("the test binary");
        let out = Command::new(exe)
            .args([test, "--exact", "--nocapture"])
            .env_clear()
            .envs(self.base_env.iter().copied())
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .env(CHILD, mode)
            .output()
            .expect("the test binary runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "[{}] with {mode} environment: {}\n{stdout}\n{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn argv(&self, c: &Case<T>) -> Vec<String> {
        let Some(id) = c.id else {
            return Vec::new();
        };
        let long = self.arg(id).get_long().expect("options are long flags");
        std::iter::once(format!("--{long}"))
            .chain(c.flag.map(str::to_owned))
            .collect()
    }

    fn got(&self, c: &Case<T>, argv: &[String], file: &str) -> String {
        let o = (self.resolve)(argv, file).unwrap_or_else(|e| {
            panic!("[{}] {} with {argv:?} and `{file}`: {e}", self.name, c.key)
        });
        (c.get)(&o)
    }

    /// In the child with none of the options' variables.
    fn without_env(&self) {
        for c in &self.cases {
            let what = format!("[{}] {}", self.name, c.key);
            let line = format!("{} = {}", c.key, c.file);
            let [flag, _, file, default] = c.want;
            assert_eq!(self.got(c, &[], ""), default, "{what}: the default");
            assert_eq!(
                self.got(c, &[], &line),
                file,
                "{what}: the file over the default"
            );
            if c.id.is_none() {
                continue;
            }
            let argv = self.argv(c);
            assert_eq!(
                self.got(c, &argv, &line),
                flag,
                "{what}: the flag over the file"
            );
            if c.flag.is_none() {
                let off = format!("{} = false", c.key);
                assert_eq!(
                    self.got(c, &argv, &off),
                    flag,
                    "{what}: the flag over `false`"
                );
            }
        }
    }

    /// In the child with every option's variable set.
    fn with_env(&self) {
        for c in self.cases.iter().filter(|c| c.env.is_some()) {
            let what = format!("[{}] {}", self.name, c.key);
            let line = format!("{} = {}", c.key, c.file);
            let [flag, env, ..] = c.want;
            assert_eq!(
                self.got(c, &[], &line),
                env,
                "{what}: the variable over the file"
            );
            let argv = self.argv(c);
            assert_eq!(
                self.got(c, &argv, &line),
                flag,
                "{what}: the flag over the variable"
            );
        }
    }
}
