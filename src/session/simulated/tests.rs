//! The simulated session: scripted failures, resolution, the world, detached effects.
use super::*;
use crate::contract::normalise_number;
use crate::fence::Unfenced;

#[tokio::test]
async fn fails_first_n_then_succeeds_and_logs_each_delete() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.log");
    let session = SimulatedSession::new(
        "test",
        &SimulatedConfig {
            fail_first: 2,
            failure: SimulatedFailure::Timeout,
            effects_log: Some(log.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let chat = normalise_number("5511999999999").unwrap();
    assert_eq!(
        session.delete_chat(&chat, false, Arc::new(Unfenced)).await,
        Err(SessionError::Timeout)
    );
    assert_eq!(
        session.delete_chat(&chat, false, Arc::new(Unfenced)).await,
        Err(SessionError::Timeout)
    );
    assert_eq!(
        session.delete_chat(&chat, false, Arc::new(Unfenced)).await,
        Ok(chat.clone())
    );
    assert_eq!(session.deletes(), 1);
    let text = std::fs::read_to_string(log).unwrap();
    assert_eq!(text.lines().count(), 1);
    let fields: Vec<&str> = text.trim_end().split(' ').collect();
    assert_eq!(fields[1], "5511999999999@s.whatsapp.net");
    assert!(fields[2].parse::<u64>().is_ok(), "the mutation's time");
}

/// With detached effects (as the real actor), a delete whose command is dropped after its
/// fence let it through still happens, and is logged with the time it was asked as of;
/// one dropped while it waited for its turn is never sent.
#[tokio::test]
async fn a_detached_delete_outlives_its_dropped_command() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.log");
    let session = SimulatedSession::new(
        "test",
        &SimulatedConfig {
            latency_ms: 400,
            detached_effects: true,
            effects_log: Some(log.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let chat = normalise_number("5511999999999").unwrap();
    let fence = Arc::new(Unfenced);
    let queued = tokio::time::timeout(
        Duration::from_millis(100),
        session.delete_chat_as_of(&chat, false, 7, fence.clone()),
    )
    .await;
    assert!(queued.is_err());
    let sending = tokio::time::timeout(
        Duration::from_millis(300),
        session.delete_chat_as_of(&chat, false, 42, fence),
    )
    .await;
    assert!(sending.is_err(), "dropped while its delete was sent");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while session.deletes() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = std::fs::read_to_string(log).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.trim_end().ends_with(" 42"), "{text}");
}

#[tokio::test]
async fn disconnected_session_answers_not_connected() {
    let session = SimulatedSession::new(
        "test",
        &SimulatedConfig {
            connected: false,
            ..Default::default()
        },
    )
    .unwrap();
    let chat = normalise_number("5511999999999").unwrap();
    assert_eq!(session.state(), SessionState::NotPaired);
    assert_eq!(
        session.delete_chat(&chat, false, Arc::new(Unfenced)).await,
        Err(SessionError::NotConnected)
    );
    assert_eq!(session.deletes(), 0);
}

#[tokio::test]
async fn numbers_resolve_as_scripted_and_jids_as_given() {
    let scripted = normalise_number("553187654321@s.whatsapp.net").unwrap();
    let session = SimulatedSession::new(
        "test",
        &SimulatedConfig {
            resolve: [("5531987654321".to_owned(), scripted.clone())].into(),
            ..Default::default()
        },
    )
    .unwrap();
    let chat = normalise_number("5531987654321").unwrap();
    let by_number = session.delete_chat(&chat, true, Arc::new(Unfenced)).await;
    assert_eq!(by_number, Ok(scripted));
    let as_given = session.delete_chat(&chat, false, Arc::new(Unfenced)).await;
    assert_eq!(as_given, Ok(chat));
}

/// Lets the effect go on, then has another client take the session over: the replacement
/// lands between the fence check and the act, as when the worker is paused (SIGSTOP) right
/// after its check and the instance's next owner connects meanwhile.
struct ReplacedAfterTheCheck(SimulatedSession);

impl Fence for ReplacedAfterTheCheck {
    fn check(&self) -> Result<(), Fenced> {
        use futures_util::FutureExt;
        self.0.open().now_or_never().expect("nothing to wait for");
        Ok(())
    }
}

fn lines_of(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[tokio::test]
async fn a_replaced_client_is_refused_and_only_a_delete_begun_after_the_replacement_is_an_overlap()
{
    let world = tempfile::tempdir().unwrap();
    let cfg = SimulatedConfig {
        world_dir: Some(world.path().to_owned()),
        ..Default::default()
    };
    let old = SimulatedSession::new("inst", &cfg).unwrap();
    old.open().await;
    let next = SimulatedSession::new("inst", &cfg).unwrap();
    let chat = normalise_number("5511999999999").unwrap();

    // Under way when the next owner connected: the world refuses it, as WhatsApp refuses a
    // replaced client, and the worker's fence did its part.
    let under_way = old
        .delete_chat(&chat, false, Arc::new(ReplacedAfterTheCheck(next)))
        .await;
    assert_eq!(under_way, Err(SessionError::NotConnected));
    assert_eq!(lines_of(&world.path().join("refused.log")), 1);
    assert_eq!(lines_of(&world.path().join("overlaps.log")), 0);

    // Begun after the replacement (a fence that let it through): an overlap.
    let begun_after = old.delete_chat(&chat, false, Arc::new(Unfenced)).await;
    assert_eq!(begun_after, Err(SessionError::NotConnected));
    assert_eq!(lines_of(&world.path().join("overlaps.log")), 1);
    assert_eq!(old.deletes(), 0);
}

/// Counts the writes it gets: a line in several is a line a kill can tear.
#[derive(Default)]
struct Writes(Vec<Vec<u8>>);

impl Write for Writes {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn an_effect_line_is_written_in_one_piece() {
    let mut file = Writes::default();
    append_line(&mut file, "1733000000000000 5511999999999@s.whatsapp.net").unwrap();
    assert_eq!(
        file.0,
        [b"1733000000000000 5511999999999@s.whatsapp.net\n".to_vec()]
    );
}
