//! The media purge on a real disk (tempfile): prefix isolation, many files, names, failures
//! and resume, traversal, symlinks.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::Command;

use chat_delete_worker::media::*;
use chat_delete_worker::telemetry::{MEDIA_BYTES_DELETED, MEDIA_OBJECTS_DELETED};
use common::media::*;

#[tokio::test]
async fn disk_prefix_isolation_and_empty_parents() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("media");
    write(&root.join("inst/5511@s.whatsapp.net/a.jpg"), 100);
    write(&root.join("inst/5511@s.whatsapp.net/sub/deeper/b.ogg"), 50);
    write(&root.join(format!("inst/{LONGER_JID}/keep.jpg")), 7);
    write(&root.join("inst/5511@s.whatsapp.net.bak/keep.jpg"), 7);
    write(&root.join("other/5511@s.whatsapp.net/keep.jpg"), 7);
    write(&root.join("solo/5511@s.whatsapp.net/x.jpg"), 3);
    let store = MediaStore::from_config(&disk_config(&root)).unwrap();

    let report = store.purge_chat("inst", JID, unfenced()).await.unwrap();
    assert_eq!(
        report,
        PurgeReport {
            objects: 2,
            bytes: 150
        }
    );
    let expected: BTreeSet<String> = [
        "inst",
        "inst/5511999999999@s.whatsapp.net",
        "inst/5511999999999@s.whatsapp.net/keep.jpg",
        "inst/5511@s.whatsapp.net.bak",
        "inst/5511@s.whatsapp.net.bak/keep.jpg",
        "other",
        "other/5511@s.whatsapp.net",
        "other/5511@s.whatsapp.net/keep.jpg",
        "solo",
        "solo/5511@s.whatsapp.net",
        "solo/5511@s.whatsapp.net/x.jpg",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(tree(&root), expected);

    // The only chat of an instance: the emptied instance folder goes too, the root stays.
    let report = store.purge_chat("solo", JID, unfenced()).await.unwrap();
    assert_eq!(report.objects, 1);
    assert!(!root.join("solo").exists());
    assert!(root.is_dir());
}

#[tokio::test]
async fn disk_no_media_is_ok() {
    let tmp = tempfile::tempdir().unwrap();
    let store = MediaStore::from_config(&disk_config(tmp.path())).unwrap();
    assert_eq!(
        store.purge_chat("inst", JID, unfenced()).await.unwrap(),
        PurgeReport::default()
    );
    let missing_root = MediaStore::from_config(&disk_config(&tmp.path().join("nope"))).unwrap();
    assert_eq!(
        missing_root
            .purge_chat("inst", JID, unfenced())
            .await
            .unwrap()
            .objects,
        0
    );
    // An empty chat folder is removed, and reported as 0 objects.
    fs::create_dir_all(tmp.path().join("inst").join(JID)).unwrap();
    assert_eq!(
        store
            .purge_chat("inst", JID, unfenced())
            .await
            .unwrap()
            .objects,
        0
    );
    assert!(tree(tmp.path()).is_empty());
}

#[tokio::test]
async fn disk_many_files_all_gone_and_counted() {
    let recorder = recorder();
    let tmp = tempfile::tempdir().unwrap();
    let chat = tmp.path().join("inst").join(JID);
    let mut bytes = 0;
    for i in 0..2_600 {
        let len = 1 + i % 40;
        bytes += len as u64;
        write(
            &chat
                .join(["img", "audio", "doc"][i % 3])
                .join(format!("{i:05}.bin")),
            len,
        );
    }
    write(&tmp.path().join("inst/other@s.whatsapp.net/keep"), 1);
    let objects_before = recorder.get(MEDIA_OBJECTS_DELETED);
    let bytes_before = recorder.get(MEDIA_BYTES_DELETED);
    let store = MediaStore::from_config(&disk_config(tmp.path())).unwrap();

    let report = store.purge_chat("inst", JID, unfenced()).await.unwrap();
    assert_eq!(
        report,
        PurgeReport {
            objects: 2_600,
            bytes
        }
    );
    assert!(!chat.exists());
    assert!(tmp.path().join("inst/other@s.whatsapp.net/keep").exists());
    // Other tests add to the same global counters, never subtract.
    assert!(recorder.get(MEDIA_OBJECTS_DELETED) - objects_before >= 2_600);
    assert!(recorder.get(MEDIA_BYTES_DELETED) - bytes_before >= bytes);
}

#[tokio::test]
async fn disk_names_with_spaces_and_unicode() {
    let tmp = tempfile::tempdir().unwrap();
    let chat = tmp.path().join("inst").join(JID);
    for name in [
        "a b.jpg",
        "ção 📷.jpg",
        "  leading",
        "nested dir/ünï cødé.ogg",
        "-rf",
    ] {
        write(&chat.join(name), 5);
    }
    let store = MediaStore::from_config(&disk_config(tmp.path())).unwrap();
    assert_eq!(
        store
            .purge_chat("inst", JID, unfenced())
            .await
            .unwrap()
            .objects,
        5
    );
    assert!(tree(tmp.path()).is_empty());
}

/// Clears the immutable flag even when an assertion fails, so the temp folder can be removed.
struct Immutable(PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[tokio::test]
async fn disk_failure_mid_purge_then_resume() {
    // On the target dir's file system (ext4 here); tmpfs may not support the immutable flag.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let chat = tmp.path().join("inst").join(JID);
    for i in 0..300 {
        write(&chat.join(format!("{i:03}.jpg")), 2);
    }
    let locked = chat.join("sub/locked.jpg");
    write(&locked, 9);
    let set = Command::new("chattr").arg("+i").arg(&locked).output();
    if !set.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: chattr +i is not available here ({set:?})");
        return;
    }
    let guard = Immutable(locked.clone());
    let store = MediaStore::from_config(&disk_config(tmp.path())).unwrap();

    let err = store.purge_chat("inst", JID, unfenced()).await.unwrap_err();
    assert!(matches!(err, MediaError::Disk { .. }), "{err}");
    assert!(
        !err.is_retryable(),
        "EPERM will not go away by itself: {err}"
    );
    assert_eq!(
        err.reason(),
        "disk unlink failed after 1 try (permission denied)"
    );
    assert!(!err.reason().contains(tmp.path().to_str().unwrap()));
    // Everything else went; the purge did not stop at the first failure.
    let left: BTreeSet<String> = ["sub", "sub/locked.jpg"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(tree(&chat), left);

    drop(guard);
    assert_eq!(
        store.purge_chat("inst", JID, unfenced()).await.unwrap(),
        PurgeReport {
            objects: 1,
            bytes: 9
        }
    );
    assert!(tree(tmp.path()).is_empty());
}

#[tokio::test]
async fn disk_path_traversal_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("media");
    write(&root.join("inst").join(JID).join("a.jpg"), 1);
    write(&root.join("inst/other/a.jpg"), 1);
    write(&root.join("keep.jpg"), 1);
    write(&tmp.path().join("outside/other/a.jpg"), 1);
    write(&tmp.path().join("etc/passwd"), 1);
    let before = tree(tmp.path());
    let store = MediaStore::from_config(&disk_config(&root)).unwrap();
    for (instance, jid) in BAD_INPUTS {
        let err = store
            .purge_chat(instance, jid, unfenced())
            .await
            .expect_err(jid);
        assert!(
            matches!(err, MediaError::InvalidPrefix(_)),
            "{instance:?} {jid:?}: {err}"
        );
        assert!(!err.is_retryable());
        assert!(
            err.reason().starts_with("unsafe media prefix"),
            "{}",
            err.reason()
        );
    }
    assert_eq!(tree(tmp.path()), before, "a refused purge touched the disk");
}

#[tokio::test]
async fn disk_symlinks_are_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("media");
    let outside = tmp.path().join("outside");
    write(&outside.join("secret.txt"), 10);
    write(&outside.join("dir/inner.txt"), 10);
    let chat = root.join("inst").join(JID);
    write(&chat.join("real.jpg"), 4);
    symlink(outside.join("secret.txt"), chat.join("file-link")).unwrap();
    symlink(outside.join("dir"), chat.join("dir-link")).unwrap();
    symlink("/nonexistent/target", chat.join("dangling")).unwrap();
    let store = MediaStore::from_config(&disk_config(&root)).unwrap();

    let report = store.purge_chat("inst", JID, unfenced()).await.unwrap();
    // Links are objects of the chat (removed as links) but free no file bytes.
    assert_eq!(
        report,
        PurgeReport {
            objects: 4,
            bytes: 4
        }
    );
    assert!(!chat.exists());
    let outside_tree: BTreeSet<String> = ["dir", "dir/inner.txt", "secret.txt"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(tree(&outside), outside_tree);

    // The chat folder itself is a link to a folder outside the root: only the link goes.
    fs::create_dir_all(root.join("inst")).unwrap();
    symlink(&outside, &chat).unwrap();
    let report = store.purge_chat("inst", JID, unfenced()).await.unwrap();
    assert_eq!(report.objects, 1);
    assert!(fs::symlink_metadata(&chat).is_err(), "link left behind");
    assert_eq!(tree(&outside), outside_tree);

    // A folder above the chat folder is a link: refused, nothing deleted anywhere.
    write(&outside.join("inst2").join(JID).join("x.jpg"), 1);
    symlink(outside.join("inst2"), root.join("inst2")).unwrap();
    let err = store
        .purge_chat("inst2", JID, unfenced())
        .await
        .unwrap_err();
    assert!(matches!(err, MediaError::SymlinkInPath { .. }), "{err}");
    assert!(!err.is_retryable());
    assert!(outside.join("inst2").join(JID).join("x.jpg").exists());
}

#[tokio::test]
async fn disk_root_may_be_a_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("volume");
    write(&real.join("inst").join(JID).join("a.jpg"), 3);
    write(&real.join("keep.jpg"), 3);
    symlink(&real, tmp.path().join("media")).unwrap();
    let store = MediaStore::from_config(&disk_config(&tmp.path().join("media"))).unwrap();
    assert_eq!(
        store
            .purge_chat("inst", JID, unfenced())
            .await
            .unwrap()
            .objects,
        1
    );
    let expected: BTreeSet<String> = ["keep.jpg".to_string()].into();
    assert_eq!(tree(&real), expected);
}

/// A purge deletes nothing once its command's claim no longer holds.
#[tokio::test]
async fn disk_purge_stops_at_a_fence_that_no_longer_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join(format!("inst/{JID}/a.jpg"));
    write(&file, 10);
    let store = MediaStore::from_config(&disk_config(tmp.path())).unwrap();
    let err = store.purge_chat("inst", JID, refused()).await.unwrap_err();
    assert!(matches!(err, MediaError::Fenced(_)), "{err}");
    assert!(!err.is_retryable());
    assert!(file.exists(), "nothing deleted");
}
