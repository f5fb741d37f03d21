//! The stored form of a record: a small binary layout, expiry first so the sweep reads it
//! without decoding the rest. Records written as JSON by earlier versions are still read.

use super::super::{Fingerprint, Record, Remembered};

/// First byte of a record in the binary layout (a JSON record starts with `{`). Format 1 is
/// format 2 without `seen_ms` (records of earlier versions).
const FORMAT: u8 = 2;
const FORMAT_WITHOUT_SEEN: u8 = 1;

/// `FORMAT`, expires_ms, lease_until_ms (u64 LE), chat_deleted (u8), seen_ms (u64 LE),
/// fingerprint, lease owner and deletion (each u16 LE length + UTF-8; an empty owner is no
/// lease, an empty deletion none; the deletion is JSON), then the remembered result as JSON,
/// or nothing. Format 1 has neither seen_ms nor the deletion.
pub(super) fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(168);
    out.push(FORMAT);
    out.extend_from_slice(&record.expires_ms.to_le_bytes());
    out.extend_from_slice(&record.lease_until_ms.to_le_bytes());
    out.push(u8::from(record.chat_deleted));
    out.extend_from_slice(&record.seen_ms.to_le_bytes());
    let deletion = record
        .deletion
        .as_ref()
        .map(|d| serde_json::to_string(d).expect("a deletion serialises"))
        .unwrap_or_default();
    for text in [
        record.fingerprint.0.as_str(),
        record.lease_owner.as_deref().unwrap_or(""),
        deletion.as_str(),
    ] {
        let len = u16::try_from(text.len()).expect("fingerprints and claims are short");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    if let Some(result) = &record.result {
        serde_json::to_writer(&mut out, result).expect("a result serialises");
    }
    out
}

/// The record, or why the bytes are not one.
pub(super) fn decode(bytes: &[u8]) -> Result<Record, String> {
    if bytes.first() == Some(&b'{') {
        return serde_json::from_slice(bytes).map_err(|e| e.to_string());
    }
    let truncated = || "truncated record".to_owned();
    let (format, mut rest) = match bytes.split_first() {
        Some((&format, rest)) if format == FORMAT || format == FORMAT_WITHOUT_SEEN => {
            (format, rest)
        }
        _ => return Err("unknown record format".into()),
    };
    let mut take = |n: usize| -> Result<&[u8], String> {
        let (head, tail) = rest.split_at_checked(n).ok_or_else(truncated)?;
        rest = tail;
        Ok(head)
    };
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let expires_ms = u64_at(take(8)?);
    let lease_until_ms = u64_at(take(8)?);
    let chat_deleted = take(1)?[0] != 0;
    let seen_ms = match format {
        FORMAT => u64_at(take(8)?),
        _ => 0,
    };
    let mut text = || -> Result<String, String> {
        let len = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes"));
        String::from_utf8(take(usize::from(len))?.to_vec()).map_err(|e| e.to_string())
    };
    let fingerprint = Fingerprint(text()?);
    let lease_owner = Some(text()?).filter(|owner| !owner.is_empty());
    let deletion = match format {
        FORMAT => Some(text()?).filter(|d| !d.is_empty()),
        _ => None,
    };
    let deletion = deletion
        .map(|json| serde_json::from_str(&json).map_err(|e| e.to_string()))
        .transpose()?;
    let result = match rest {
        [] => None,
        json => Some(serde_json::from_slice::<Remembered>(json).map_err(|e| e.to_string())?),
    };
    Ok(Record {
        fingerprint,
        expires_ms,
        lease_owner,
        lease_until_ms,
        chat_deleted,
        result,
        seen_ms,
        deletion,
    })
}

/// A record's expiry, read without decoding the rest.
pub(super) fn expires_of(bytes: &[u8]) -> Option<u64> {
    match bytes.first() {
        Some(&FORMAT | &FORMAT_WITHOUT_SEEN) => bytes
            .get(1..9)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
        _ => decode(bytes).ok().map(|r| r.expires_ms),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::contract::Outcome;

    pub(in crate::idempotency) fn record(expires_ms: u64, result: Option<Remembered>) -> Record {
        Record {
            fingerprint: Fingerprint("f".repeat(64)),
            expires_ms,
            lease_owner: Some("process/7".into()),
            lease_until_ms: 42,
            chat_deleted: true,
            result,
            seen_ms: 1_733_000_000_000,
            deletion: Some(crate::contract::Deletion {
                chat: crate::contract::normalise_number("5511999999999").unwrap(),
                known: crate::contract::ChatKnown::False,
                at_ms: 1_733_000_000_500,
            }),
        }
    }

    #[test]
    fn records_round_trip_and_json_records_of_earlier_versions_are_read() {
        let done = Remembered {
            outcome: Outcome::InvalidNumber,
            attempts: 3,
            receipt: None,
        };
        for original in [record(1_000, None), record(2_000, Some(done))] {
            let bytes = encode(&original);
            let back = decode(&bytes).unwrap();
            assert_eq!(format!("{back:?}"), format!("{original:?}"));
            assert_eq!(expires_of(&bytes), Some(original.expires_ms));
            let json = serde_json::to_vec(&original).unwrap();
            assert_eq!(
                format!("{:?}", decode(&json).unwrap()),
                format!("{original:?}")
            );
            assert_eq!(expires_of(&json), Some(original.expires_ms));
        }
        let bytes = encode(&record(1, None));
        assert!(decode(&bytes[..bytes.len() - 1]).is_err(), "truncated");
        assert!(decode(b"\x07junk").is_err(), "unknown layout");
    }

    /// The bytes of a stored record, pinned: records outlive the version that wrote them (24 h
    /// of results by default), so a change here must keep reading this, and the format of the
    /// version before (without `seen_ms`) too.
    #[test]
    fn stored_record_bytes_are_pinned() {
        let mut stored = record(
            0x0102_0304_0506_0708,
            Some(Remembered {
                outcome: Outcome::NotConnected,
                attempts: 1,
                receipt: None,
            }),
        );
        stored.fingerprint = Fingerprint("ab".into());
        stored.lease_owner = None;
        stored.seen_ms = 0x1122;
        stored.deletion = None;
        let result = hex::encode(br#"{"outcome":"NotConnected","attempts":1}"#);
        let golden = concat!(
            "02",               // format
            "0807060504030201", // expires_ms
            "2a00000000000000", // lease_until_ms
            "01",               // chat_deleted
            "2211000000000000", // seen_ms
            "0200",
            "6162", // fingerprint "ab"
            "0000", // no lease owner
            "0000", // no deletion
        )
        .to_owned()
            + &result;
        assert_eq!(hex::encode(encode(&stored)), golden);
        let back = decode(&hex::decode(&golden).unwrap()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{stored:?}"));

        let before = concat!(
            "01",               // format of the version before
            "0807060504030201", // expires_ms
            "2a00000000000000", // lease_until_ms
            "01",               // chat_deleted
            "0200",
            "6162", // fingerprint "ab"
            "0000", // no lease owner
        )
        .to_owned()
            + &result;
        stored.seen_ms = 0;
        let back = decode(&hex::decode(&before).unwrap()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{stored:?}"));
    }
}
