fn main() {
    let root = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let workers: u32 = std::env::args().nth(2).unwrap().parse().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let drain = std::thread::spawn(move || {
        let mut n = 0usize;
        while let Some(c) = rx.blocking_recv() {
            if let Ok(deis_backup_proto::v1::Chunk {
                kind: Some(deis_backup_proto::v1::chunk::Kind::Data(d)),
            }) = c
            {
                n += d.len();
            }
        }
        n
    });
    let t = std::time::Instant::now();
    let tr = deis_backup_agent::store::archive::archive(&root, 3, workers, tx).unwrap();
    eprintln!(
        "{:?} raw {} comp {}",
        t.elapsed(),
        tr.raw_bytes,
        tr.compressed_bytes
    );
    drain.join().unwrap();
}
