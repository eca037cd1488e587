//! `qrexec-client-vm`: call a Qubes RPC service in another VM.
//!
//! `qrexec-client-vm [options] TARGET_VMNAME SERVICE[+ARGUMENT] [LOCAL_PROGRAM [ARGS...]]`;
//! see `--help` and the `qrexec::cli` module.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    // The libraries never print: `qrexec::cli` installs the command's logger
    // (one `qrexec-client-vm: ...` line per event, the debug trace with -v).
    qrexec::cli::main()
}
