//! The real-stack cases (filled in below).

pub fn run(_args: &[String]) -> Result<(), String> {
    Err("not yet".into())
}

pub fn inner(_args: &[String]) -> Result<(), String> {
    Err("not yet".into())
}
