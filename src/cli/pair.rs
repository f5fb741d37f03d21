//! `pair` and `unpair`: linking a `whatsapp` instance to a phone and back. `pair` shows the QR
//! code in the terminal (refreshed as codes rotate), or an 8-character pairing code for
//! `--phone`, and ends once the session is saved or pairing failed.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use tokio::sync::mpsc;
use whatsapp_rust::prelude::{Event, EventKind};

use crate::config::{Config, InstanceKind};
use crate::session::SessionOptions;
use crate::session::whatsapp::{OpenError, SessionLock, build_bot, paired_as, unpair};

/// The session settings of a configured `whatsapp` instance.
pub fn whatsapp_options(config: &Config, instance: &str) -> anyhow::Result<SessionOptions> {
    let cfg = config
        .instances
        .get(instance)
        .ok_or_else(|| anyhow::anyhow!("no instance {instance:?} in the config"))?;
    anyhow::ensure!(
        cfg.kind == InstanceKind::Whatsapp,
        "instance {instance} is {:?}, not a whatsapp instance",
        cfg.kind
    );
    Ok(SessionOptions {
        store_path: config.session_store_path(instance),
        delete_timeout: Duration::from_millis(config.worker.delete_timeout_ms),
        shutdown_deadline: Duration::from_millis(config.worker.shutdown_grace_ms),
        transport_url: cfg.transport_url.clone(),
    })
}

/// `pair <instance>`: links the instance and says how to make a running worker pick it up.
pub async fn run_pair(
    config: &Config,
    instance: &str,
    phone: Option<&str>,
    limit: Duration,
) -> anyhow::Result<ExitCode> {
    let options = whatsapp_options(config, instance)?;
    let number = pair(&options, phone, &mut std::io::stdout(), limit).await?;
    println!(
        "Instance {instance} is paired as {number}; its session is saved in {}.\nReload a running worker: kill -HUP <pid>, or POST /admin/reload on its HTTP port.",
        options.store_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `unpair <instance>`: logs the device out and removes the session file.
pub async fn run_unpair(config: &Config, instance: &str) -> anyhow::Result<ExitCode> {
    let options = whatsapp_options(config, instance)?;
    if unpair(&options).await? {
        println!("Instance {instance} is unpaired; its session file is removed.");
    } else {
        println!("Instance {instance} has no session file.");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("already paired as {0}; run `unpair` first to link another phone")]
    AlreadyPaired(String),
    #[error("WhatsApp refused the pairing: {0}")]
    Refused(String),
    #[error("no QR code was scanned before they ran out; run `pair` again")]
    QrCodesExhausted,
    #[error("the pairing code was refused{0}")]
    CodeRefused(String),
    #[error("no pairing within {0:?}")]
    TimedOut(Duration),
    #[error("the connection ended before pairing completed")]
    Disconnected,
}

/// Renders a QR payload as terminal text (two modules per character row), dark on light.
pub fn render_qr(payload: &str) -> String {
    use qrcode::render::unicode::Dense1x2;
    match qrcode::QrCode::new(payload.as_bytes()) {
        Ok(code) => code
            .render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
        Err(_) => format!("(cannot render a QR code; payload: {payload})"),
    }
}

/// Pairs the session at `options.store_path`; returns the linked number.
pub async fn pair(
    options: &SessionOptions,
    phone: Option<&str>,
    out: &mut (impl Write + Send),
    limit: Duration,
) -> Result<String, PairError> {
    let _lock = SessionLock::acquire(&options.store_path)?;
    let (events, mut inbox) = mpsc::unbounded_channel();
    let bot = build_bot(
        options,
        &[
            EventKind::PairingQrCode,
            EventKind::PairingCode,
            EventKind::PairError,
            EventKind::PairingQrCodesExhausted,
            EventKind::PairingCodeError,
        ],
        phone,
        move |event| {
            let _ = events.send(event);
        },
    )
    .await?;
    let client = bot.client();
    if let Some(number) = paired_as(&client) {
        return Err(PairError::AlreadyPaired(number));
    }
    let handle = bot.spawn();
    let _ = writeln!(out, "Connecting to WhatsApp...");
    let outcome = tokio::time::timeout(limit, async {
        let mut linked = false;
        while let Some(event) = inbox.recv().await {
            match &*event {
                Event::PairingQrCode(qr) if phone.is_none() => {
                    let _ = writeln!(
                        out,
                        "\n{}\nScan with WhatsApp on the phone: Settings > Linked devices > Link a device (valid {} s; a new code follows).",
                        render_qr(&qr.code),
                        qr.timeout.as_secs()
                    );
                }
                Event::PairingCode(code) => {
                    let _ = writeln!(
                        out,
                        "\nPairing code: {}\nOn the phone: Settings > Linked devices > Link a device > Link with phone number instead, then enter it (valid about {} s).",
                        code.code,
                        code.timeout.as_secs()
                    );
                }
                Event::PairSuccess(_) => {
                    linked = true;
                    let _ = writeln!(out, "Linked; waiting for the session to be ready...");
                }
                Event::Connected(_) if linked || client.pn().is_some() => {
                    return paired_as(&client).ok_or(PairError::Disconnected);
                }
                Event::PairError(e) => return Err(PairError::Refused(e.error.clone())),
                Event::PairingQrCodesExhausted(_) => return Err(PairError::QrCodesExhausted),
                Event::PairingCodeError(e) => {
                    let why = e
                        .rejection
                        .as_ref()
                        .map(|r| format!(": {r:?}"))
                        .unwrap_or_default();
                    return Err(PairError::CodeRefused(why));
                }
                Event::LoggedOut(_) => return Err(PairError::Disconnected),
                _ => {}
            }
        }
        Err(PairError::Disconnected)
    })
    .await
    .unwrap_or(Err(PairError::TimedOut(limit)));
    // Disconnecting flushes the new session to its file.
    let _ = tokio::time::timeout(options.shutdown_deadline, handle.shutdown()).await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qr_codes_render_as_terminal_blocks() {
        let text = render_qr("2@abcDEF123,xyz,ABC=,def=");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() > 10);
        assert!(
            lines
                .iter()
                .all(|l| l.chars().count() == lines[0].chars().count())
        );
        assert!(text.contains('█') || text.contains('▀') || text.contains('▄'));
    }

    #[tokio::test]
    async fn pairing_a_session_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let options = SessionOptions {
            store_path: dir.path().join("a.db"),
            delete_timeout: Duration::from_secs(1),
            shutdown_deadline: Duration::from_secs(1),
            transport_url: Some("ws://127.0.0.1:1".into()),
        };
        let _held = SessionLock::acquire(&options.store_path).unwrap();
        let err = pair(&options, None, &mut Vec::new(), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, PairError::Open(OpenError::Busy(_))), "{err}");
    }
}
