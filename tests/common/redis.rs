//! A Redis server of the test's own (Debian's `redis-server`), to stop, restart and configure
//! without touching the one other tests share.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct PrivateRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts a server on a free port; `extra` are `redis-server` arguments
    /// (`--maxmemory 2mb`...). It keeps its data in an append-only file, so a restart keeps it.
    pub async fn start(extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        redis.resume().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to the server process.
    #[allow(dead_code)]
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let sent = Command::new("kill").args([signal, &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill {signal} {pid}");
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// Starts the server again (after `stop`), with its data.
    pub async fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.cli(&["ping"]).as_deref() != Some("PONG") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server on {} never answered",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server (cleanly: its append-only file is complete).
    pub async fn stop(&mut self) {
        let _ = self.cli(&["shutdown"]);
        if let Some(mut child) = self.child.take() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "redis-server did not stop"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// `redis-cli` against this server: its output, or `None` when it failed.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .filter(|text| !text.starts_with("Could not connect"))
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
