//! `qrexec-client-vm`: call a Qubes RPC service in another VM.
#![forbid(unsafe_code)]

fn main() {
    eprintln!("qrexec-client-vm: not implemented yet");
    std::process::exit(1);
}
