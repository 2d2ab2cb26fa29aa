//! Progress bars for the long steps: one per bucket (objects and bytes against the listing) and
//! one per part (bytes and rate). Drawn on stderr only when it is a terminal, never with `--json`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use deis_backup_coordinator::mirror;
use deis_backup_coordinator::snapshot;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Bars {
    multi: MultiProgress,
    by_name: Mutex<HashMap<String, ProgressBar>>,
    /// Per bucket: objects done, objects listed.
    objects: Mutex<HashMap<String, (u64, u64)>>,
}

impl Bars {
    pub fn new(json: bool) -> Self {
        let target = if json {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
            by_name: Mutex::new(HashMap::new()),
            objects: Mutex::new(HashMap::new()),
        }
    }

    fn bar(&self, name: &str, make: impl FnOnce() -> ProgressBar) -> ProgressBar {
        let mut bars = self.by_name.lock().expect("progress lock");
        bars.entry(name.to_owned())
            .or_insert_with(|| {
                let b = self.multi.add(make());
                b.enable_steady_tick(Duration::from_millis(250));
                b
            })
            .clone()
    }

    pub fn finish(&self) {
        for b in self.by_name.lock().expect("progress lock").values() {
            b.finish();
        }
    }
}

impl mirror::Progress for Bars {
    fn listed(&self, bucket: &str, objects: u64, bytes: u64) {
        let b = self.bar(bucket, || {
            ProgressBar::new(bytes).with_style(
                ProgressStyle::with_template(
                    "{prefix:<32} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
                )
                .expect("template"),
            )
        });
        b.set_prefix(format!("bucket {bucket}"));
        b.set_length(bytes);
        b.set_message(format!("0/{objects} objects"));
        self.objects
            .lock()
            .expect("progress lock")
            .insert(bucket.to_owned(), (0, objects));
    }

    fn object_done(&self, bucket: &str, _key: &str, size: u64, _transferred: bool) {
        let b = self.bar(bucket, ProgressBar::no_length);
        b.inc(size);
        let mut objects = self.objects.lock().expect("progress lock");
        let entry = objects.entry(bucket.to_owned()).or_default();
        entry.0 += 1;
        b.set_message(format!("{}/{} objects", entry.0, entry.1));
    }
}

impl snapshot::Progress for Bars {
    fn part_started(&self, part: &str, source: &str) {
        let b = self.bar(part, || {
            ProgressBar::no_length().with_style(
                ProgressStyle::with_template(
                    "{prefix:<32} {spinner} {bytes} {binary_bytes_per_sec} {msg}",
                )
                .expect("template"),
            )
        });
        b.set_prefix(part.to_owned());
        b.set_message(source.to_owned());
    }

    fn part_bytes(&self, part: &str, bytes: u64) {
        self.bar(part, ProgressBar::no_length).inc(bytes);
    }

    fn part_finished(&self, part: &str, ok: bool) {
        let b = self.bar(part, ProgressBar::no_length);
        b.finish_with_message(if ok { "done" } else { "FAILED" });
    }
}
