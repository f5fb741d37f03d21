//! What the chat index costs an instance: memory per chat, the save of a history sync's worth
//! of chats and the load at every open, in a real SQLite session file and in PostgreSQL.
//! Run by `scripts/bench-chat-index` (release build); prints a table and a last line of figures.
//!
//!   cargo run --release --example chat_index_bench -- [CHATS] [POSTGRES_URL]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use tokio::time::Instant;

use chat_delete_worker::session::postgres::PgSessions;
use chat_delete_worker::session::whatsapp::chat_store::ChatStore;
use chat_delete_worker::session::whatsapp::chats::{ChatIndex, MessageKey};

/// Counts live heap bytes, to weigh the index.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A chat the size real ones are: a LID with its phone-number twin and a last message key.
fn fill(index: &mut ChatIndex, chats: usize) {
    for n in 0..chats {
        let key = MessageKey {
            id: format!("3EB0{n:016X}"),
            from_me: n % 2 == 0,
            participant: None,
        };
        let lid = format!("{:015}@lid", 100_000_000_000_000 + n);
        let phone = format!("55119{n:08}@s.whatsapp.net");
        index.message(&lid, Some(&phone), 1_700_000_000 + n as i64, key);
    }
}

async fn time_store(name: &str, store: &ChatStore, chats: usize) -> (f64, f64) {
    let mut index = store.load(chats).await.expect("load");
    fill(&mut index, chats);
    let started = Instant::now();
    store.save(index.changes()).await.expect("save");
    let save = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let loaded = store.load(chats).await.expect("load");
    let load = started.elapsed().as_secs_f64();
    assert_eq!(loaded.len(), chats, "{name}: every chat read back");
    println!("{name:<12} {chats:>8} {save:>10.3} {load:>10.3}");
    (save, load)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let chats: usize = args.next().map_or(20_000, |n| n.parse().expect("CHATS"));
    let url = args
        .next()
        .or_else(|| std::env::var("CDW_TEST_POSTGRES_URL").ok())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());

    let before = LIVE.load(Ordering::Relaxed);
    let mut index = ChatIndex::new(chats);
    fill(&mut index, chats);
    let _ = index.changes();
    let per_chat = (LIVE.load(Ordering::Relaxed) - before) as f64 / chats as f64;
    drop(index);

    println!(
        "{:<12} {:>8} {:>10} {:>10}",
        "store", "chats", "save_s", "load_s"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let file = ChatStore::File(dir.path().join("bench.db"));
    let (sqlite_save, sqlite_load) = time_store("sqlite", &file, chats).await;
    let sessions = PgSessions::connect(&url).await.expect("PostgreSQL");
    let instance = format!("bench-chat-index-{}", std::process::id());
    let opened = sessions.open(&instance, None).await.expect("open");
    let shared = ChatStore::Shared(opened.clone());
    let (pg_save, pg_load) = time_store("postgres", &shared, chats).await;
    opened.erase().await.expect("clean up");
    println!(
        "chats={chats} bytes_per_chat={per_chat:.0} sqlite_save_s={sqlite_save:.3} sqlite_load_s={sqlite_load:.3} pg_save_s={pg_save:.3} pg_load_s={pg_load:.3}"
    );
}
