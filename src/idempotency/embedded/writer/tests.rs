//! The writer thread: groups, commits that fail, sweeps, and begins beside it.
use super::super::codec::tests::record;
use std::sync::RwLock;

use super::claims::committed;
use super::*;
use crate::contract::Outcome;
use crate::idempotency::{Lifetimes, claim_name};

const L: Lifetimes = Lifetimes {
    claim: Duration::from_secs(60),
    keep: Duration::from_secs(600),
};

fn writer(dir: &tempfile::TempDir) -> Writer {
    let path = dir.path().join("s.redb");
    let db = Arc::new(RwLock::new(Some(open(&path).unwrap())));
    Writer::new(Arc::new(Claims::new(db, "p".into(), L)), path)
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint(s.into())
}

fn begin(fingerprint: &str) -> (Op, oneshot::Receiver<Result<Begin, StoreError>>) {
    let (reply, answer) = oneshot::channel();
    let fingerprint = fp(fingerprint);
    let claim = claim_name("p");
    let op = Op::Begin {
        fingerprint,
        claim,
        reply,
    };
    (op, answer)
}

fn write(change: Change) -> (Op, oneshot::Receiver<Result<Written, StoreError>>) {
    let (reply, answer) = oneshot::channel();
    (Op::Write { change, reply }, answer)
}

fn remember(claim: &str, fingerprint: &str, outcome: Outcome) -> Change {
    Change::Remember {
        claim: claim.into(),
        fingerprint: fp(fingerprint),
        result: Remembered {
            outcome,
            attempts: 1,
            receipt: None,
        },
    }
}

/// Applies `ops` as one group, as the writer thread does, and returns whether it committed.
fn group(writer: &mut Writer, ops: Vec<(&str, Op)>) -> bool {
    let (tx, rx) = mpsc::channel();
    let mut ops = ops.into_iter().map(|(id, op)| (id.to_owned(), op));
    let first = ops.next().unwrap();
    for op in ops {
        tx.send(op).unwrap();
    }
    writer.commit_group(first, &rx, false).is_some()
}

fn claim_of(answer: oneshot::Receiver<Result<Begin, StoreError>>) -> String {
    match answer.blocking_recv().unwrap().unwrap() {
        Begin::Claimed { claim, .. } => claim,
        other => panic!("expected a claim, got {other:?}"),
    }
}

/// A begin that reads a result written in the same group is not answered before the
/// commit; when the commit fails, it fails too, instead of replaying a result that was
/// never stored.
#[test]
fn no_replay_from_a_write_that_did_not_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = writer(&dir);
    let (op, answer) = begin("a");
    group(&mut writer, vec![("x", op)]);
    let claim = claim_of(answer);

    writer.fail_commits = 1;
    let (remembered, remember_answer) = write(remember(&claim, "a", Outcome::InvalidNumber));
    let (again, begin_answer) = begin("a");
    assert!(!group(&mut writer, vec![("x", remembered), ("x", again)]));
    assert!(remember_answer.blocking_recv().unwrap().is_err());
    assert!(
        matches!(
            begin_answer.blocking_recv().unwrap(),
            Err(StoreError::Embedded(_))
        ),
        "the begin waited for the commit and failed with it"
    );

    // The file is opened again; the same write now goes through and replays follow.
    let (remembered, remember_answer) = write(remember(&claim, "a", Outcome::InvalidNumber));
    let (again, begin_answer) = begin("a");
    assert!(group(&mut writer, vec![("x", remembered), ("x", again)]));
    assert_eq!(
        remember_answer.blocking_recv().unwrap().unwrap(),
        Written::Done
    );
    assert!(matches!(
        begin_answer.blocking_recv().unwrap().unwrap(),
        Begin::Replay(_)
    ));
}

/// A begin beside the writer decides from the claims in memory and the committed records,
/// and leaves to the writer an id whose write is not committed yet.
#[test]
fn begins_beside_the_writer_read_claims_and_committed_records_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = writer(&dir);
    let claims = writer.claims.clone();
    let begin_beside = |id: &str, f: &str| {
        claims
            .begin(id, &fp(f), &claims.new_claim())
            .map(Result::unwrap)
    };
    let Some(Begin::Claimed { claim, .. }) = begin_beside("x", "a") else {
        panic!("a fresh id is claimed")
    };
    assert_eq!(begin_beside("x", "a"), Some(Begin::Busy));
    assert_eq!(begin_beside("x", "b"), Some(Begin::Conflict));

    let done = Remembered {
        outcome: Outcome::InvalidNumber,
        attempts: 1,
        receipt: None,
    };
    let (mine, other) = (fp(&"f".repeat(64)), fp("other"));
    let txn = writer.begin_write().unwrap();
    {
        let mut records = txn.open_table(RECORDS).unwrap();
        let live = encode(&record(now_ms() + 60_000, Some(done.clone())));
        records.insert("done", live.as_slice()).unwrap();
        let expired = encode(&record(now_ms() - 1, Some(done.clone())));
        records.insert("expired", expired.as_slice()).unwrap();
    }
    let unread = |id| committed(&claims.db, id).unwrap().unwrap().is_none();
    assert!(unread("done"), "not committed yet");
    txn.commit().unwrap();
    assert_eq!(
        claims
            .begin("done", &mine, &claims.new_claim())
            .unwrap()
            .unwrap(),
        Begin::Replay(done)
    );
    assert_eq!(
        claims
            .begin("done", &other, &claims.new_claim())
            .unwrap()
            .unwrap(),
        Begin::Conflict
    );
    assert!(matches!(
        claims.begin("expired", &other, &claims.new_claim()),
        Some(Ok(Begin::Claimed { .. }))
    ));

    // A result in the group being committed: the writer answers, after the commit.
    let (remembered, _) = write(remember(&claim, "a", Outcome::InvalidNumber));
    let (tx, rx) = mpsc::channel();
    let mut deferred = Deferred::default();
    writer
        .apply_group(("x".into(), remembered), &rx, false, &mut deferred)
        .unwrap();
    drop(tx);
    assert!(
        claims.begin("x", &fp("a"), &claims.new_claim()).is_none(),
        "unsettled: the writer decides"
    );
    writer.settle(&deferred.written);
    assert!(matches!(
        claims.begin("x", &fp("a"), &claims.new_claim()),
        Some(Ok(Begin::Replay(_)))
    ));
    assert!(
        !claims.pending().contains_key("x"),
        "answered: out of memory"
    );
}

/// Writes after a claim do not depend on the record still being there, never overwrite
/// another request's record, and never replace a result already remembered.
#[test]
fn writes_recreate_vanished_records_and_respect_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = writer(&dir);
    let (op, answer) = write(remember("p/1", "a", Outcome::InvalidBody));
    assert!(group(&mut writer, vec![("gone", op)]));
    assert_eq!(answer.blocking_recv().unwrap().unwrap(), Written::Done);
    let (op, answer) = begin("a");
    group(&mut writer, vec![("gone", op)]);
    assert!(matches!(
        answer.blocking_recv().unwrap().unwrap(),
        Begin::Replay(_)
    ));

    let (op, answer) = write(remember("p/2", "b", Outcome::InvalidNumber));
    group(&mut writer, vec![("gone", op)]);
    assert!(matches!(
        answer.blocking_recv().unwrap(),
        Err(StoreError::Superseded)
    ));
    let (op, answer) = write(remember("p/3", "a", Outcome::InvalidNumber));
    group(&mut writer, vec![("gone", op)]);
    assert!(
        matches!(answer.blocking_recv().unwrap().unwrap(), Written::Kept(r) if r.outcome == Outcome::InvalidBody)
    );

    let deletion = crate::contract::Deletion {
        chat: crate::contract::normalise_number("5511999999999").unwrap(),
        known: crate::contract::ChatKnown::True,
        at_ms: 1_733_000_000_000,
    };
    let mark = Change::MarkChatDeleted {
        claim: "p/4".into(),
        fingerprint: fp("c"),
        deletion: deletion.clone(),
    };
    let (op, answer) = write(mark);
    group(&mut writer, vec![("marked", op)]);
    assert_eq!(answer.blocking_recv().unwrap().unwrap(), Written::Done);
    // The record came back with the claim that wrote it: others wait, then resume after
    // the delete.
    let (op, answer) = begin("c");
    group(&mut writer, vec![("marked", op)]);
    assert_eq!(answer.blocking_recv().unwrap().unwrap(), Begin::Busy);
    let (op, _) = write(Change::Release {
        claim: "p/4".into(),
    });
    let (again, answer) = begin("c");
    group(&mut writer, vec![("marked", op), ("marked", again)]);
    assert!(matches!(
        answer.blocking_recv().unwrap().unwrap(),
        Begin::Claimed {
            chat_deleted: true,
            deletion: Some(d),
            ..
        } if d == deletion
    ));
}

#[test]
fn a_sweep_forgets_expired_records_but_not_live_claims() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = writer(&dir);
    let now = 10_000;
    let txn = writer.begin_write().unwrap();
    {
        let mut records = txn.open_table(RECORDS).unwrap();
        let put = |records: &mut Records<'_>, id: &str, r: &Record| {
            records.insert(id, encode(r).as_slice()).unwrap();
        };
        put(&mut records, "old", &record(now - 1, None));
        put(&mut records, "live", &record(now + 1, None));
        put(&mut records, "reclaimed", &record(now - 1, None));
        // Claimed again in memory (its lease runs): the sweep leaves it to the claim.
        let mut claim = record(now + 1, None);
        claim.lease_until_ms = now + 1;
        let unsettled = false;
        let entry = Entry {
            record: claim,
            unsettled,
        };
        writer.claims.pending().insert("reclaimed".into(), entry);
        let mut written = HashSet::new();
        assert!(writer.sweep(&mut records, now, &mut written).unwrap());
        assert!(records.get("old").unwrap().is_none());
        assert!(records.get("live").unwrap().is_some());
        assert!(records.get("reclaimed").unwrap().is_some());
        assert_eq!(writer.sweep_from, None, "the walk reached the end");
        // A claim past its lease goes to disk, and leaves memory once committed.
        let mut pending = writer.claims.pending();
        pending.get_mut("reclaimed").unwrap().record.lease_until_ms = now;
        drop(pending);
        writer.sweep(&mut records, now, &mut written).unwrap();
        assert_eq!(written, HashSet::from(["reclaimed".to_owned()]));
        writer.settle(&written);
        assert!(writer.claims.pending().is_empty());
        let stored = decode(records.get("reclaimed").unwrap().unwrap().value()).unwrap();
        assert_eq!(stored.expires_ms, now + 1);
    }
    txn.commit().unwrap();
}
