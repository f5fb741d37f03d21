//! The Redis store against the local Redis, each test under a prefix of its own.

use futures_util::future::join_all;

use super::*;
use crate::contract::Outcome;

/// The local Redis (the test suite's `scripts/services` starts it), under a prefix of its own.
async fn store() -> (RedisStore, String) {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("test:batch:{}:", uuid::Uuid::new_v4().simple());
    let lifetimes = Lifetimes {
        claim: Duration::from_secs(60),
        keep: Duration::from_secs(600),
    };
    (
        RedisStore::connect(&url, &prefix, lifetimes).await.unwrap(),
        prefix,
    )
}

/// Operations sent together share script calls and looks share pipelines, yet each gets its
/// own answer: one claim per id however many ask at once, and a record Redis refuses to
/// read fails only its own operation or look.
#[tokio::test]
async fn batched_operations_answer_one_by_one() {
    let (store, prefix) = store().await;
    let fp = Fingerprint("a".into());
    let ids: Vec<String> = (0..300).map(|i| format!("id{}", i % 100)).collect();
    let begins = join_all(ids.iter().map(|id| store.begin(id, &fp, 0))).await;
    let claimed = begins
        .iter()
        .filter(|b| matches!(b, Ok(Begin::Claimed { .. })))
        .count();
    let busy = begins
        .iter()
        .filter(|b| matches!(b, Ok(Begin::Busy)))
        .count();
    assert_eq!((claimed, busy), (100, 200));

    let held: Vec<Held> = ids
        .iter()
        .zip(begins)
        .filter_map(|(id, begin)| match begin {
            Ok(Begin::Claimed { claim, .. }) => Some(Held {
                id: id.clone(),
                claim,
                fingerprint: fp.clone(),
                generation: 0,
                seen_ms: 0,
            }),
            _ => None,
        })
        .collect();
    let done = Remembered {
        outcome: Outcome::InvalidNumber,
        attempts: 1,
        receipt: None,
    };
    let remembered = join_all(held.iter().map(|h| store.remember(h, &done))).await;
    assert!(remembered.iter().all(|r| r.as_ref().ok() == Some(&done)));

    let mut conn = store.connection.clone();
    let _: () = ::redis::cmd("SET")
        .arg(format!("{prefix}wrongtype"))
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Replays and conflicts, whether read with HMGET or asked of the script.
    let again = join_all(ids[..100].iter().map(|id| store.begin(id, &fp, 0))).await;
    assert!(
        again
            .iter()
            .all(|b| matches!(b, Ok(Begin::Replay(r)) if r == &done))
    );
    let other = Fingerprint("b".into());
    let conflicts = join_all(ids[..100].iter().map(|id| store.begin(id, &other, 0))).await;
    assert!(conflicts.iter().all(|b| matches!(b, Ok(Begin::Conflict))));
    // The conflicts were all read, so every begin now looks first: the pipeline of looks
    // that carries a record Redis refuses to read answers every other look.
    let mut replaying: Vec<&str> = ids[..100].iter().map(String::as_str).collect();
    replaying.insert(50, "wrongtype");
    let again = join_all(replaying.iter().map(|id| store.begin(id, &fp, 0))).await;
    for (id, begin) in replaying.iter().zip(&again) {
        match (*id, begin) {
            ("wrongtype", Err(StoreError::Redis(_))) => {}
            (_, Ok(Begin::Replay(r))) if r == &done => {}
            other => panic!("unexpected answer {other:?}"),
        }
    }

    // Renewals always go through the script: the batch that carries a record Redis
    // refuses to read answers every other renewal.
    let mut renewing = held.clone();
    renewing.insert(
        50,
        Held {
            id: "wrongtype".into(),
            claim: "c".into(),
            fingerprint: fp.clone(),
            generation: 0,
            seen_ms: 0,
        },
    );
    let renewed = join_all(renewing.iter().map(|h| store.renew(h))).await;
    for (h, renewed) in renewing.iter().zip(&renewed) {
        match (h.id.as_str(), renewed) {
            ("wrongtype", Err(StoreError::Redis(_))) => {}
            (_, Ok(false)) => {}
            other => panic!("unexpected answer {other:?}"),
        }
    }

    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = ::redis::cmd("DEL")
        .arg(keys)
        .query_async(&mut conn)
        .await
        .unwrap();
}

fn test_deletion() -> Deletion {
    Deletion {
        chat: crate::contract::normalise_number("5511999999999").unwrap(),
        known: crate::contract::ChatKnown::Unknown,
        at_ms: 1_733_000_000_000,
    }
}

/// A live claim taken under an older generation of the instance's lease (its previous
/// owner's, whose fence refuses its effects now) is taken over at once by a begin under a
/// newer one, keeping its progress; the claim of a lone worker (generation 0) and one of
/// the same generation are waited out.
#[tokio::test]
async fn a_newer_owner_takes_over_the_claims_its_predecessor_left() {
    let (store, prefix) = store().await;
    let fp = Fingerprint("a".into());
    let mut held = Vec::new();
    for (id, generation) in [("left", 3), ("lone", 0)] {
        let Ok(Begin::Claimed { claim, .. }) = store.begin(id, &fp, generation).await else {
            panic!("not claimed");
        };
        let fingerprint = fp.clone();
        let (id, claim) = (id.into(), claim);
        held.push(Held {
            id,
            claim,
            fingerprint,
            generation,
            seen_ms: 0,
        });
    }
    store
        .mark_chat_deleted(&held[0], &test_deletion())
        .await
        .unwrap();
    for generation in [0, 3] {
        let again = store.begin("left", &fp, generation).await.unwrap();
        assert_eq!(again, Begin::Busy, "asked under generation {generation}");
    }
    let taken = store.begin("left", &fp, 4).await.unwrap();
    assert!(
        matches!(
            &taken,
            Begin::Claimed {
                chat_deleted: true,
                deletion: Some(deletion),
                ..
            } if *deletion == test_deletion()
        ),
        "{taken:?}"
    );
    assert!(
        !store.renew(&held[0]).await.unwrap(),
        "the old claim is over"
    );
    assert_eq!(store.begin("lone", &fp, 7).await.unwrap(), Begin::Busy);
    assert!(store.renew(&held[1]).await.unwrap());

    let _: () = ::redis::cmd("DEL")
        .arg(&prefix)
        .arg(format!("{prefix}left"))
        .arg(format!("{prefix}lone"))
        .query_async(&mut store.connection.clone())
        .await
        .unwrap();
}

/// Defect (found by review): a renewal (or a mark) that found the record gone wrote it
/// again under generation 0, "no ownership", so the next owner's begin under a newer
/// generation waited for the claim to end instead of taking it over.
#[tokio::test]
async fn a_record_written_again_keeps_the_generation_of_its_claim() {
    let (store, prefix) = store().await;
    let fp = Fingerprint("a".into());
    let Ok(Begin::Claimed { claim, seen_ms, .. }) = store.begin("again", &fp, 3).await else {
        panic!("not claimed");
    };
    let held = Held {
        id: "again".into(),
        claim,
        fingerprint: fp.clone(),
        generation: 3,
        seen_ms,
    };
    let key = format!("{prefix}again");
    let mut conn = store.connection.clone();
    let _: () = ::redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        store.renew(&held).await.unwrap(),
        "renewed by writing it again"
    );
    let taken = store.begin("again", &fp, 4).await.unwrap();
    assert!(
        matches!(taken, Begin::Claimed { seen_ms: s, .. } if s == seen_ms),
        "taken over with the first try's time: {taken:?}"
    );
    let _: () = ::redis::cmd("DEL")
        .arg(&prefix)
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// A result answered soon after its claim keeps the claim's expiry (no index update); one
/// answered later than a hundredth of the keep time is kept for the keep time from then.
/// Either way the expiry field and the index agree, which the sweep relies on.
#[tokio::test]
async fn a_late_answer_moves_the_expiry_and_a_quick_one_does_not() {
    let (store, prefix) = store().await;
    let mut conn = store.connection.clone();
    let fp = Fingerprint("a".into());
    let done = Remembered {
        outcome: Outcome::InvalidNumber,
        attempts: 1,
        receipt: None,
    };
    let mut expiry = async |id: &str| -> (u64, u64) {
        let field: u64 = ::redis::cmd("HGET")
            .arg(format!("{prefix}{id}"))
            .arg("expires")
            .query_async(&mut conn)
            .await
            .unwrap();
        let score: u64 = ::redis::cmd("ZSCORE")
            .arg(&prefix)
            .arg(id)
            .query_async(&mut conn)
            .await
            .unwrap();
        (field, score)
    };
    let mut held = Vec::new();
    for id in ["quick", "late"] {
        let Ok(Begin::Claimed { claim, .. }) = store.begin(id, &fp, 0).await else {
            panic!("not claimed");
        };
        held.push(Held {
            id: id.into(),
            claim,
            fingerprint: fp.clone(),
            generation: 0,
            seen_ms: 0,
        });
    }
    let (claimed, indexed) = expiry("quick").await;
    assert_eq!(claimed, indexed);
    let (late, _) = expiry("late").await;
    // As if "quick" was claimed a second ago (within a hundredth of the keep time, 600 s)
    // and "late" a minute ago.
    let claimed = claimed - 1_000;
    let mut pipe = ::redis::pipe();
    for (id, at) in [("quick", claimed), ("late", late - 60_000)] {
        pipe.hset(format!("{prefix}{id}"), "expires", at)
            .zadd(&prefix, id, at);
    }
    let _: () = pipe
        .query_async(&mut store.connection.clone())
        .await
        .unwrap();

    for h in &held {
        assert_eq!(store.remember(h, &done).await.unwrap(), done);
    }
    assert_eq!(
        expiry("quick").await,
        (claimed, claimed),
        "a quick answer moves nothing"
    );
    let (moved, indexed) = expiry("late").await;
    assert_eq!(moved, indexed);
    assert!(
        moved >= late,
        "kept the keep time from the answer: {moved} < {late}"
    );
    let _: () = ::redis::cmd("DEL")
        .arg(&prefix)
        .arg(format!("{prefix}quick"))
        .arg(format!("{prefix}late"))
        .query_async(&mut store.connection.clone())
        .await
        .unwrap();
}
