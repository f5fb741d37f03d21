//! The purge on a local disk: a recursive walk that never follows symlinks (a link is removed
//! as a link), deletes the files of each folder on a few threads, then removes the emptied
//! folders, including the chat folder and emptied parents up to (not including) the root.
//!
//! Known limit: std has no `openat`/`unlinkat`, so the walk works on paths; someone able to
//! write into the media root could swap a checked folder for a symlink between the check and
//! the delete.

use std::fs;
use std::io;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use super::retry::Retry;
use super::{MediaError, MediaRetryConfig, Totals};
use crate::fence::Fence;

/// Below this many files in a folder, extra threads cost more than they save.
const DISK_FILES_PER_THREAD: usize = 256;

/// A root folder holding media.
#[derive(Clone, Debug)]
pub(super) struct Disk {
    pub(super) root: PathBuf,
}

impl Disk {
    /// Deletes everything under `segments` (below the root); each pass runs on a blocking
    /// thread, and a failed pass is tried again from the top.
    pub(super) async fn purge(
        &self,
        segments: &[String],
        concurrency: usize,
        retry: &MediaRetryConfig,
        totals: &Arc<Totals>,
        fence: Arc<dyn Fence>,
    ) -> Result<(), MediaError> {
        let mut retry = Retry::new(retry);
        let segments: Arc<[String]> = segments.into();
        loop {
            let (root, segments, totals) = (self.root.clone(), segments.clone(), totals.clone());
            let fence = fence.clone();
            let pass = tokio::task::spawn_blocking(move || {
                purge_pass(&root, &segments, concurrency, &totals, fence.as_ref())
            })
            .await
            .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()));
            let Err(mut e) = pass else {
                return Ok(());
            };
            let again = "Media disk purge incomplete; retrying.";
            if !retry.again(e.is_retryable(), &e, again).await {
                if let MediaError::Disk { attempts, .. } = &mut e {
                    *attempts = retry.tries();
                }
                return Err(e);
            }
        }
    }
}

fn disk_error(op: &'static str, path: &FsPath, source: io::Error) -> MediaError {
    MediaError::Disk {
        op,
        path: path.to_owned(),
        attempts: 1,
        source,
    }
}

fn purge_pass(
    root: &FsPath,
    segments: &[String],
    concurrency: usize,
    totals: &Totals,
    fence: &dyn Fence,
) -> Result<(), MediaError> {
    // The root may itself be a symlink (an operator's choice); everything below it must not be.
    let root = match fs::canonicalize(root) {
        Ok(root) => root,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(disk_error("open root", root, e)),
    };
    let mut dir = root.clone();
    for (i, segment) in segments.iter().enumerate() {
        dir.push(segment);
        let meta = match fs::symlink_metadata(&dir) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(disk_error("stat", &dir, e)),
        };
        let is_chat_folder = i + 1 == segments.len();
        if meta.file_type().is_symlink() {
            if !is_chat_folder {
                return Err(MediaError::SymlinkInPath { path: dir });
            }
            // The chat folder is a link: remove the link, never what it points to.
            fence.check().map_err(MediaError::Fenced)?;
            match fs::remove_file(&dir) {
                Ok(()) => totals.add(1, 0),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(disk_error("unlink", &dir, e)),
            }
            remove_empty_parents(&root, &dir);
            return Ok(());
        }
        if !meta.is_dir() {
            // A file where a folder should be: nothing of this chat can be below it.
            return Ok(());
        }
    }
    purge_tree(&dir, concurrency, totals, fence)?;
    remove_empty_parents(&root, &dir);
    Ok(())
}

/// Removes `top` and everything in it, without following symlinks. Iterative (post-order) so
/// that a deep tree cannot overflow the stack.
fn purge_tree(
    top: &FsPath,
    concurrency: usize,
    totals: &Totals,
    fence: &dyn Fence,
) -> Result<(), MediaError> {
    let mut first_error: Option<MediaError> = None;
    let mut stack = vec![(top.to_owned(), false)];
    while let Some((dir, emptied)) = stack.pop() {
        if emptied {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Expected when something below failed; that error is the one to report.
                Err(_) if first_error.is_some() => {}
                Err(e) => first_error = Some(disk_error("rmdir", &dir, e)),
            }
            continue;
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                first_error.get_or_insert(disk_error("read folder", &dir, e));
                continue;
            }
        };
        stack.push((dir.clone(), true));
        let mut files = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    first_error.get_or_insert(disk_error("read folder", &dir, e));
                    continue;
                }
            };
            // From the directory entry itself (lstat semantics): a symlink is never a folder here.
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push((entry.path(), false)),
                Ok(_) => files.push(entry),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    first_error.get_or_insert(disk_error("stat", &entry.path(), e));
                }
            }
        }
        // Each folder's files are one batch, deleted only while the fence holds.
        fence.check().map_err(MediaError::Fenced)?;
        let (objects, bytes, error) = delete_files(&files, concurrency);
        // Counted per folder: one metrics update instead of one per file.
        totals.add(objects, bytes);
        if let Some(e) = error {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Deletes non-folder entries (files, symlinks, sockets...) of one folder; large folders are
/// split across up to `concurrency` threads. Returns what was deleted and the first error.
fn delete_files(files: &[fs::DirEntry], concurrency: usize) -> (u64, u64, Option<MediaError>) {
    let threads = concurrency.min(files.len() / DISK_FILES_PER_THREAD).max(1);
    if threads == 1 {
        return delete_chunk(files);
    }
    let chunk = files.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = files
            .chunks(chunk)
            .map(|part| scope.spawn(move || delete_chunk(part)))
            .collect();
        workers
            .into_iter()
            .fold((0, 0, None), |(o, b, err), worker| {
                let (objects, bytes, error) = worker
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (o + objects, b + bytes, err.or(error))
            })
    })
}

fn delete_chunk(files: &[fs::DirEntry]) -> (u64, u64, Option<MediaError>) {
    let (mut objects, mut bytes, mut first_error) = (0, 0, None);
    for entry in files {
        // Size from the entry (no symlink following); links free no file data, so count 0.
        let size = match entry.metadata() {
            Ok(meta) if meta.is_file() => meta.len(),
            _ => 0,
        };
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => {
                objects += 1;
                bytes += size;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                first_error.get_or_insert(disk_error("unlink", &path, e));
            }
        }
    }
    (objects, bytes, first_error)
}

/// Removes the folders between `root` (excluded) and `chat_folder` (excluded) that the purge
/// left empty, deepest first; stops at the first one still in use.
fn remove_empty_parents(root: &FsPath, chat_folder: &FsPath) {
    let mut current = chat_folder.parent();
    while let Some(dir) = current {
        if dir == root || !dir.starts_with(root) || fs::remove_dir(dir).is_err() {
            break;
        }
        current = dir.parent();
    }
}
