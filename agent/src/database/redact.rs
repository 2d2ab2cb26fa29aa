//! What a RestoreDatabase error may quote: the kind of the statement an input line belongs to (its
//! leading keywords), never the statement's text; and psql's own messages with secrets taken out.
//!
//! Invariants:
//! - A statement kind is made only of upper-case keywords (`ALTER ROLE`, `COPY`, `CREATE TABLE`),
//!   a psql meta-command's name (`\connect`) or `statement`: never an identifier's lower-case name,
//!   a literal or row data. The kind is a light scanner's reading (COPY data blocks and
//!   dollar-quoted bodies are followed; a multi-line string literal can mislead it); the line
//!   number psql names is exact.
//! - Quoted psql output never carries the statement echo (`LINE n: …` and its caret line), a
//!   `PASSWORD '…'` literal, a PostgreSQL `md5…` or `SCRAM-SHA-256$…` hash, a `$`-separated
//!   password hash (Django's `pbkdf2_sha256$…`), a run of 32 or more hex digits (hashes, API
//!   tokens), the row values of a key or of a COPY context; and when the statement can carry
//!   secrets (roles, rows, or a kind not recognised) no quoted text at all.

use std::borrow::Cow;

/// The kind of a statement whose leading keywords are not recognised.
pub(super) const UNKNOWN: &str = "statement";

/// A statement of the SQL, as errors name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Statement {
    /// Its first input line, from 1.
    pub start: u64,
    /// Its leading keywords (see the module doc).
    pub kind: String,
}

impl Statement {
    /// Whether the statement can carry a secret (a role's password, rows of data), so that psql's
    /// messages about it are quoted without any quoted text.
    pub(super) fn carries_secrets(&self) -> bool {
        let mut words = self.kind.split(' ');
        let first = words.next().unwrap_or_default();
        self.kind == UNKNOWN
            || matches!(first, "COPY" | "INSERT" | "UPDATE")
            || self
                .kind
                .split(' ')
                .any(|w| matches!(w, "ROLE" | "USER" | "GROUP"))
    }
}

/// Follows the statements of the SQL line by line, from each line's first and last bytes.
#[derive(Debug, Clone, Default)]
pub(super) struct Statements {
    /// A statement started and has not ended with `;` yet.
    open: bool,
    /// Inside the data of `COPY … FROM stdin;`, up to its `\.` line.
    copy: bool,
    /// Inside a dollar-quoted body opened by this tag (`$$`, `$_$`, `$body$`).
    dollar: Option<Vec<u8>>,
    current: Option<Statement>,
}

impl Statements {
    /// Takes input line `no`: its first bytes `head` (all of it when `whole`) and its last bytes
    /// `tail`, newline excluded.
    pub(super) fn line(&mut self, no: u64, head: &[u8], whole: bool, tail: &[u8]) {
        if self.copy {
            if whole && trim_end(head) == b"\\." {
                self.copy = false;
            }
            return;
        }
        if !self.open {
            let t = trim_start(head);
            if t.is_empty() || t.starts_with(b"--") {
                return;
            }
            if t.first() == Some(&b'\\') {
                self.current = Some(Statement {
                    start: no,
                    kind: meta_command(t),
                });
                return;
            }
            self.current = Some(Statement {
                start: no,
                kind: keywords(t),
            });
            self.open = true;
        }
        if whole {
            self.dollar_quotes(head);
        }
        let end = trim_end(tail);
        if self.dollar.is_none() && end.ends_with(b";") {
            self.open = false;
            let copy = self.current.as_ref().is_some_and(|s| s.kind == "COPY");
            if copy && end.ends_with(b"FROM stdin;") {
                self.copy = true;
            }
        }
    }

    /// The statement the last line taken belongs to (or the last one before it).
    pub(super) fn current(&self) -> Option<&Statement> {
        self.current.as_ref()
    }

    /// Opens or closes dollar quotes on one whole line.
    fn dollar_quotes(&mut self, line: &[u8]) {
        let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let mut i = 0;
        while i < line.len() {
            // A `$` inside an identifier (`a$b`) opens nothing.
            if line[i] != b'$' || (i > 0 && ident(line[i - 1])) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            if j < line.len() && (line[j].is_ascii_alphabetic() || line[j] == b'_') {
                while j < line.len() && ident(line[j]) {
                    j += 1;
                }
            }
            if line.get(j) != Some(&b'$') {
                i += 1;
                continue;
            }
            let tag = &line[i..=j];
            match &self.dollar {
                None => self.dollar = Some(tag.to_vec()),
                Some(open) if open == tag => self.dollar = None,
                Some(_) => {}
            }
            i = j + 1;
        }
    }
}

fn trim_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

fn trim_end(b: &[u8]) -> &[u8] {
    let n = b
        .iter()
        .rev()
        .take_while(|c| c.is_ascii_whitespace())
        .count();
    &b[..b.len() - n]
}

/// Up to three leading upper-case keywords of a statement's first line.
fn keywords(t: &[u8]) -> String {
    let words: Vec<&str> = t
        .split(|b| b.is_ascii_whitespace() || matches!(b, b'(' | b';' | b','))
        .filter(|w| !w.is_empty())
        .take_while(|w| w.len() <= 24 && w.iter().all(|b| b.is_ascii_uppercase() || *b == b'_'))
        .take(3)
        .filter_map(|w| std::str::from_utf8(w).ok())
        .collect();
    if words.is_empty() {
        UNKNOWN.to_owned()
    } else {
        words.join(" ")
    }
}

/// The name of a psql meta-command (`\connect`), without its arguments.
fn meta_command(t: &[u8]) -> String {
    let word: Vec<u8> = t
        .iter()
        .copied()
        .take_while(|b| !b.is_ascii_whitespace())
        .collect();
    let plain = word.len() <= 20
        && word[1..]
            .iter()
            .all(|b| b.is_ascii_lowercase() || matches!(b, b'!' | b'?'));
    if plain {
        String::from_utf8_lossy(&word).into_owned()
    } else {
        "psql meta-command".to_owned()
    }
}

/// psql's output as an error or a reply may quote it: without the statement echo and secrets,
/// and without any quoted text when `secret` (the statement can carry secrets). `cut` says the
/// text is the tail of a longer output, so its first line may be a fragment and is dropped.
pub(super) fn psql_output(text: &str, cut: bool, secret: bool) -> String {
    let mut out: Vec<Cow<str>> = Vec::new();
    let mut lines = text.lines();
    if cut {
        lines.next();
    }
    let mut after_echo = false;
    for line in lines {
        if after_echo && line.trim() == "^" {
            after_echo = false;
            continue;
        }
        after_echo = false;
        if let Some(n) = echo_line(line) {
            out.push(format!("LINE {n}: (statement text withheld)").into());
            after_echo = true;
            continue;
        }
        let clean = row_values(&secrets(line));
        out.push(if secret {
            withhold_quoted(&clean).into()
        } else {
            clean.into()
        });
    }
    let text = out.join("\n");
    if text.trim().is_empty() {
        "(nothing)".to_owned()
    } else {
        text
    }
}

/// The line number of psql's statement echo (`LINE 3: CREATE …`).
fn echo_line(line: &str) -> Option<u64> {
    let (n, _) = line.strip_prefix("LINE ")?.split_once(':')?;
    n.parse().ok()
}

/// `text` without password literals and password hashes (see the module doc).
pub(super) fn secrets(text: &str) -> String {
    tokens(&password_literals(text))
}

/// Every `PASSWORD '…'` (or `E'…'`) literal as `PASSWORD '…'`; an unterminated one to the end.
fn password_literals(text: &str) -> String {
    const KEYWORD: &str = "password";
    let lower = text.to_ascii_lowercase();
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while let Some(found) = lower[at..].find(KEYWORD) {
        let after = at + found + KEYWORD.len();
        let mut i = after;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let escapes = matches!(b.get(i), Some(b'E' | b'e')) && b.get(i + 1) == Some(&b'\'');
        if escapes {
            i += 1;
        }
        if b.get(i) != Some(&b'\'') {
            out.push_str(&text[at..after]);
            at = after;
            continue;
        }
        // The literal ends at a quote that is neither doubled nor (in E'…') backslashed.
        let mut j = i + 1;
        let mut closed = false;
        while j < b.len() {
            match b[j] {
                b'\\' if escapes => j += 2,
                b'\'' if b.get(j + 1) == Some(&b'\'') => j += 2,
                b'\'' => {
                    closed = true;
                    j += 1;
                    break;
                }
                _ => j += 1,
            }
        }
        out.push_str(&text[at..=i]);
        out.push('…');
        if closed {
            out.push('\'');
        }
        at = j.min(b.len());
    }
    out.push_str(&text[at..]);
    out
}

/// Applies [`token`] to every run of characters between blanks, quotes, brackets and separators.
fn tokens(text: &str) -> String {
    let delimiter = |c: char| c.is_whitespace() || matches!(c, '\'' | '"' | '(' | ')' | ',' | ';');
    let mut out = String::with_capacity(text.len());
    let mut start = None;
    for (i, c) in text.char_indices() {
        if delimiter(c) {
            if let Some(s) = start.take() {
                out.push_str(&token(&text[s..i]));
            }
            out.push(c);
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        out.push_str(&token(&text[s..]));
    }
    out
}

/// One token with a password hash in it withheld.
fn token(t: &str) -> Cow<'_, str> {
    const SCRAM: &str = "SCRAM-SHA-256$";
    if t.starts_with(SCRAM) {
        return format!("{SCRAM}…").into();
    }
    if let Some(p) = t.find('$') {
        let scheme = &t[..p];
        let hashed = !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            && t[p + 1..].contains('$')
            && t.len() >= 16;
        if hashed {
            return format!("{scheme}$…").into();
        }
    }
    hex_runs(t)
}

/// `t` with every run of 32 or more hex digits withheld (`md5` in front of one is kept).
fn hex_runs(t: &str) -> Cow<'_, str> {
    let b = t.as_bytes();
    let mut out = String::new();
    let mut last = 0;
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_hexdigit() {
            i += 1;
            continue;
        }
        let mut s = i;
        while i < b.len() && b[i].is_ascii_hexdigit() {
            i += 1;
        }
        if i - s >= 32 {
            // `md5<hex>`: the `d5` belongs to the scheme's name.
            if s > 0 && b[s - 1] == b'm' && b[s..].starts_with(b"d5") {
                s += 2;
            }
            out.push_str(&t[last..s]);
            out.push('…');
            last = i;
        }
    }
    if last == 0 {
        Cow::Borrowed(t)
    } else {
        out.push_str(&t[last..]);
        Cow::Owned(out)
    }
}

/// A message line without the row values it quotes: `Key (k)=(v)`, `Failing row contains (…)`,
/// and the row of a COPY context (`COPY t, line 3, column c: "v"`).
fn row_values(line: &str) -> String {
    const FAILING: &str = "Failing row contains (";
    if let Some(i) = line.find(")=(") {
        let suffix = line
            .rfind(')')
            .filter(|e| *e > i + 2)
            .map_or("", |e| &line[e + 1..]);
        return format!("{}…){suffix}", &line[..i + 3]);
    }
    if let Some(i) = line.find(FAILING) {
        return format!("{}…)", &line[..i + FAILING.len()]);
    }
    if let Some(c) = line.find("COPY ")
        && let Some(l) = line[c..].find(", line ")
        && let Some(q) = line[c + l..].find(": ")
    {
        return format!("{}: …", &line[..c + l + q]);
    }
    line.to_owned()
}

/// `line` with the inside of every `"…"` and `'…'` withheld (an unterminated one to the end).
fn withhold_quoted(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '"' || c == '\'' {
            out.push('…');
            if chars.by_ref().any(|d| d == c) {
                out.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MD5: &str = "md5a3556571e93b0d20722ba62be61e8c2d";
    const SCRAM: &str = "SCRAM-SHA-256$4096:ZmFrZXNhbHQ=$c3RvcmVka2V5Cg==:c2VydmVya2V5Cg==";

    /// The kinds of a script's lines, by line number.
    fn kinds(sql: &str) -> Vec<(u64, String)> {
        let mut s = Statements::default();
        let mut got = Vec::new();
        for (i, line) in sql.lines().enumerate() {
            let no = i as u64 + 1;
            let b = line.as_bytes();
            s.line(no, b, true, &b[b.len().saturating_sub(32)..]);
            let c = s.current().unwrap();
            got.push((c.start, c.kind.clone()));
        }
        got
    }

    #[test]
    fn statement_kinds_follow_copy_data_and_dollar_bodies() {
        let sql = "SET client_encoding = 'UTF8';\n\
                   CREATE ROLE deis;\n\
                   ALTER ROLE deis WITH NOSUPERUSER PASSWORD 'md5abc';\n\
                   \\connect deis\n\
                   COPY public.api_config (id, values) FROM stdin;\n\
                   1\tSELECT secret\n\
                   \\.\n\
                   CREATE FUNCTION f() RETURNS int AS $$\n\
                   BEGIN\n  RETURN 1;\nEND;\n$$ LANGUAGE plpgsql;\n\
                   ALTER TABLE ONLY public.api_app\n    ADD CONSTRAINT x PRIMARY KEY (id);\n";
        let got = kinds(sql);
        let at = |n: usize| got[n - 1].clone();
        assert_eq!(at(1), (1, "SET".into()));
        assert_eq!(at(3), (3, "ALTER ROLE".into()));
        assert_eq!(at(4), (4, "\\connect".into()));
        assert_eq!(at(6), (5, "COPY".into()), "COPY data is not a statement");
        assert_eq!(at(7), (5, "COPY".into()));
        assert_eq!(at(10), (8, "CREATE FUNCTION".into()), "inside $$");
        assert_eq!(at(12), (8, "CREATE FUNCTION".into()));
        assert_eq!(at(14), (13, "ALTER TABLE ONLY".into()));
        assert_eq!(keywords(b"create role x password 'y';"), UNKNOWN);
    }

    #[test]
    fn secret_bearing_statements_are_recognised() {
        let s = |k: &str| Statement {
            start: 1,
            kind: k.into(),
        };
        for k in ["ALTER ROLE", "CREATE ROLE", "CREATE USER", "COPY", UNKNOWN] {
            assert!(s(k).carries_secrets(), "{k}");
        }
        for k in ["CREATE TABLE", "ALTER TABLE ONLY", "SET", "\\connect"] {
            assert!(!s(k).carries_secrets(), "{k}");
        }
    }

    #[test]
    fn password_literals_and_hashes_are_withheld() {
        let line = format!("ALTER ROLE deis WITH LOGIN PASSWORD '{MD5}' VALID UNTIL 'infinity';");
        let r = secrets(&line);
        assert!(!r.contains("a3556571"), "{r}");
        assert!(
            r.contains("PASSWORD '…'") && r.contains("'infinity'"),
            "{r}"
        );
        let r = secrets("create role x encrypted password 'hunter2 it''s';");
        assert_eq!(r, "create role x encrypted password '…';");
        let r = secrets("ALTER ROLE x PASSWORD E'a\\'b' LOGIN");
        assert_eq!(r, "ALTER ROLE x PASSWORD E'…' LOGIN");
        let r = secrets("ALTER ROLE x PASSWORD 'never closed");
        assert!(!r.contains("never"), "{r}");
        let r = secrets(&format!("at or near \"'{MD5}'\" and {SCRAM}"));
        assert!(!r.contains("a3556571") && !r.contains("c3RvcmVk"), "{r}");
        assert!(r.contains("md5…") && r.contains("SCRAM-SHA-256$…"), "{r}");
        let django = "pbkdf2_sha256$260000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo=";
        assert_eq!(secrets(django), "pbkdf2_sha256$…");
        let token = "Key (key)=(9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b)";
        assert!(!secrets(token).contains("9944b"), "API tokens are hex runs");
        assert_eq!(
            secrets("password authentication failed"),
            "password authentication failed"
        );
    }

    #[test]
    fn psql_output_drops_the_echo_and_row_values() {
        let stderr = format!(
            "psql:<stdin>:12: ERROR:  syntax error at or near \"PASSWORD\"\n\
             LINE 1: ALTER ROLE deis PASSWORD '{MD5}' OOPS;\n\
             \x20                       ^\n\
             DETAIL:  Key (key)=(s3cr3t) already exists.\n\
             CONTEXT:  COPY api_config, line 3, column values: \"{{\\\"DB_PASS\\\": \\\"x\\\"}}\"\n"
        );
        let r = psql_output(&stderr, false, false);
        assert!(r.contains("psql:<stdin>:12: ERROR:  syntax error at or near \"PASSWORD\""));
        assert!(r.contains("LINE 1: (statement text withheld)"), "{r}");
        assert!(!r.contains('^'), "{r}");
        assert!(!r.contains("a3556571") && !r.contains("OOPS"), "{r}");
        assert!(r.contains("Key (key)=(…) already exists."), "{r}");
        assert!(!r.contains("s3cr3t") && !r.contains("DB_PASS"), "{r}");
        assert!(
            r.contains("COPY api_config, line 3, column values: …"),
            "{r}"
        );

        let e = "psql:<stdin>:3: ERROR:  invalid input syntax for integer: \"hunter2\"";
        let r = psql_output(e, false, true);
        assert_eq!(
            r,
            "psql:<stdin>:3: ERROR:  invalid input syntax for integer: \"…\""
        );
        let r = psql_output("k 'md5' x\npsql:<stdin>:1: ERROR:  boom", true, false);
        assert_eq!(
            r, "psql:<stdin>:1: ERROR:  boom",
            "a cut first line is dropped"
        );
        assert_eq!(psql_output("", false, false), "(nothing)");
    }
}
