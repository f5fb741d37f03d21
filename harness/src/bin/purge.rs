//! Benchmark driver: purges one chat and prints the purge's own wall time in seconds.
//!
//!   purge disk <root> <instance> <chat_jid>
//!   purge s3 <endpoint> <bucket> <instance> <chat_jid>
//!
//! S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. PURGE_CONCURRENCY
//! overrides the default concurrency. Stdout: the seconds; stderr: what was deleted.

use std::path::PathBuf;
use std::sync::Arc;
use tokio::time::Instant;

use chat_delete_worker::media::{DiskConfig, MediaBackend, MediaConfig, MediaStore, S3Config};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut config = MediaConfig::default();
    let (instance, chat_jid) = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["disk", root, instance, jid] => {
            config.backend = MediaBackend::Disk(DiskConfig {
                root: PathBuf::from(root),
            });
            (instance, jid)
        }
        ["s3", endpoint, bucket, instance, jid] => {
            config.backend = MediaBackend::S3(S3Config {
                bucket: bucket.into(),
                region: "us-east-1".into(),
                endpoint: Some(endpoint.into()),
                path_style: true,
                allow_http: endpoint.starts_with("http://"),
                access_key_id: None,
                secret_access_key: None,
                key_prefix: None,
                request_timeout_ms: 30_000,
            });
            (instance, jid)
        }
        _ => {
            eprintln!(
                "usage: purge disk <root> <instance> <chat_jid>\n       purge s3 <endpoint> <bucket> <instance> <chat_jid>"
            );
            std::process::exit(2);
        }
    };
    if let Ok(n) = std::env::var("PURGE_CONCURRENCY") {
        config.concurrency = n.parse().expect("PURGE_CONCURRENCY is a number");
    }
    let store = MediaStore::from_config(&config).unwrap_or_else(|e| {
        eprintln!("purge: {e}");
        std::process::exit(2);
    });
    let started = Instant::now();
    match store
        .purge_chat(
            instance,
            chat_jid,
            Arc::new(chat_delete_worker::fence::Unfenced),
        )
        .await
    {
        Ok(report) => {
            let elapsed = started.elapsed().as_secs_f64();
            eprintln!("purge: objects={} bytes={}", report.objects, report.bytes);
            println!("{elapsed:.3}");
        }
        Err(e) => {
            eprintln!("purge: failed: {e} (reason: {})", e.reason());
            std::process::exit(1);
        }
    }
}
