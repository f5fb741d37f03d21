//! The `chat-delete-worker` binary.

// Every command allocates many small buffers on several threads (frames, headers, the result
// body); glibc's allocator spent a quarter of the worker's CPU on them. Without transparent
// huge pages its RSS stays near glibc's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    chat_delete_worker::cli::main()
}
