//! The `chat-delete-worker` binary.

fn main() -> std::process::ExitCode {
    chat_delete_worker::cli::main()
}
