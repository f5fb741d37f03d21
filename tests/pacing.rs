//! Per-token pacing shared through Redis, as a bulk clean-up feels it: no sliding minute holds
//! more than the budget (plus the configured burst), a slot whose command was handed back
//! before its delete is given back, and an unreachable Redis never turns into a full budget
//! per worker.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chat_delete_worker::config::{PacingLimit, TokenHash};
use chat_delete_worker::pipeline::pacing::Pacer;
use common::redis::PrivateRedis;
use redis::aio::ConnectionManager;
use tokio::time::Instant;

async fn pacer(url: &str, prefix: &str, per_minute: u32) -> Pacer {
    let client = redis::Client::open(url).unwrap();
    let connection = ConnectionManager::new(client).await.unwrap();
    Pacer::shared(PacingLimit::PerMinute(per_minute), 0, connection, prefix)
}

fn prefix(test: &str) -> String {
    format!("test:pacing:{test}:{}:", uuid::Uuid::new_v4().simple())
}

/// Defect (found by review): a quiet token could start a whole minute's budget at once and
/// then one per interval: up to twice the budget in the first sliding minute. Measured over
/// seconds at a fast budget (100 a second): no second holds more than its share.
#[tokio::test]
async fn no_sliding_window_holds_more_than_its_share_of_the_budget() {
    let per_minute = 6_000;
    let pacer = Arc::new(pacer("redis://127.0.0.1:6379", &prefix("window"), per_minute).await);
    let token = TokenHash::of(b"window");
    let start = Instant::now();
    let mut waiting = vec![];
    for _ in 0..300 {
        let pacer = pacer.clone();
        waiting.push(tokio::spawn(async move {
            pacer.wait(&token).await.used();
            Instant::now()
        }));
    }
    let mut starts = vec![];
    for w in waiting {
        starts.push(w.await.unwrap().duration_since(start));
    }
    starts.sort();
    let window = Duration::from_secs(1);
    let most = (0..starts.len())
        .map(|i| starts[i..].partition_point(|t| *t < starts[i] + window))
        .max()
        .unwrap();
    let share = per_minute as usize / 60;
    assert!(
        most <= share + 1,
        "{most} deletes started within one second (budget {share} a second)"
    );
}

/// Defect (found by review): a command handed back while it waited for its slot (its
/// instance went to another worker) kept its reservation, so the token's next commands waited
/// for slots nobody used.
#[tokio::test]
async fn a_slot_whose_command_was_handed_back_is_given_back() {
    let prefix = prefix("back");
    let pacer = pacer("redis://127.0.0.1:6379", &prefix, 60).await;
    let token = TokenHash::of(b"back");
    let key = format!("{prefix}{}", hex::encode(token.0));
    let mut redis = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    pacer.wait(&token).await.used();
    let after_first: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    // The second command waits for its slot (a second away) and is handed back meanwhile.
    let handed_back = tokio::time::timeout(Duration::from_millis(100), pacer.wait(&token)).await;
    assert!(handed_back.is_err(), "the second command had to wait");
    let deadline = Instant::now() + common::WAIT;
    loop {
        let now: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        if now == after_first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the handed-back slot was kept: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asked = Instant::now();
    pacer.wait(&token).await.used();
    assert!(
        asked.elapsed() < Duration::from_millis(1_500),
        "the third command waited {:?}",
        asked.elapsed()
    );
}

/// Defect (found by review): when Redis failed, every worker paced on a full bucket of its
/// own: N workers, N budgets at once.
#[tokio::test]
async fn an_unreachable_redis_gives_no_worker_a_budget_of_its_own() {
    let mut redis = PrivateRedis::start(&[]).await;
    let prefix = prefix("down");
    let mut pacers = vec![];
    for _ in 0..3 {
        pacers.push(Arc::new(pacer(&redis.url(), &prefix, 60).await));
    }
    redis.stop().await;
    let token = TokenHash::of(b"down");
    let mut waiting = vec![];
    for pacer in &pacers {
        for _ in 0..5 {
            let pacer = pacer.clone();
            waiting.push(tokio::spawn(async move { pacer.wait(&token).await.used() }));
        }
    }
    // Bounded look: while Redis is down, no worker starts a delete on a budget of its own.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = waiting.iter().filter(|w| w.is_finished()).count();
    assert_eq!(started, 0, "{started} deletes started on local budgets");
    redis.resume().await;
    let first = tokio::time::timeout(common::WAIT, futures_util::future::select_all(waiting)).await;
    assert!(first.is_ok(), "a command starts once Redis is back");
}
