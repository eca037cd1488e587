//! `cargo xtask msrv`: the minimum supported Rust version, checked with the
//! one toolchain this machine has.
//!
//! No older toolchain can be fetched here, so the MSRV (`rust-version` in the
//! workspace `Cargo.toml`) is checked the way clippy can check it: its
//! `incompatible_msrv` lint rejects any standard-library item stabilised
//! after `rust-version`, and the workspace lints deny it (`Cargo.toml`), so
//! the CI clippy step fails on such a use. This command proves that the
//! check is live: it builds a canary crate, with the workspace's
//! `rust-version`, that calls an item of the next release, and fails unless
//! clippy rejects it for exactly that reason; the same canary with the
//! toolchain's own version as `rust-version` must pass (so the rejection is
//! the MSRV's doing). Then it checks that every workspace member inherits
//! `rust-version` and the lints, so the deny reaches all of them.
//!
//! What this does not catch: language features newer than the MSRV (the
//! compiler of 1.95 accepts them); `let` chains, the newest feature we use,
//! are why the MSRV is 1.88.

use std::path::Path;
use std::process::Command;

use crate::util;

/// One item per release after the MSRV that a canary can call. The first
/// entry newer than the workspace's `rust-version` is used.
const CANARIES: &[((u32, u32), &str)] = &[(
    (1, 89),
    "pub fn canary(f: &std::fs::File) -> std::io::Result<()> {\n    f.lock()\n}\n",
)];

/// `rust-version = "X.Y"` of the workspace manifest, as (X, Y).
fn workspace_msrv(manifest: &str) -> Result<(u32, u32), String> {
    let line = manifest
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("rust-version") && !l.contains("workspace"))
        .ok_or("no rust-version in the workspace Cargo.toml")?;
    let v = line
        .split_once('=')
        .map(|(_, v)| v.trim().trim_matches('"'))
        .ok_or_else(|| format!("cannot read {line:?}"))?;
    parse_version(v).ok_or_else(|| format!("cannot read the version in {line:?}"))
}

fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// The `members = [...]` of the workspace manifest (one line).
fn workspace_members(manifest: &str) -> Result<Vec<String>, String> {
    let line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .ok_or("no members in the workspace Cargo.toml")?;
    let list = line
        .split_once('[')
        .and_then(|(_, r)| r.split_once(']'))
        .map(|(l, _)| l)
        .ok_or("the members list must be on one line")?;
    Ok(list
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect())
}

/// A member manifest must inherit `rust-version` and `[lints]` from the
/// workspace (else the deny of `incompatible_msrv` does not reach it).
fn inherits_msrv_and_lints(member: &str) -> Result<(), String> {
    let lines: Vec<&str> = member.lines().map(str::trim).collect();
    if !lines.contains(&"rust-version.workspace = true") {
        return Err("no `rust-version.workspace = true`".into());
    }
    let lints = lines.iter().position(|l| *l == "[lints]");
    match lints.and_then(|i| lines.get(i + 1)) {
        Some(&"workspace = true") => Ok(()),
        _ => Err("no `[lints]` with `workspace = true`".into()),
    }
}

/// The (major, minor) of `rustc --version`.
fn toolchain_version() -> Result<(u32, u32), String> {
    let out = Command::new("rustc")
        .arg("--version")
        .output()
        .map_err(|e| format!("rustc --version: {e}"))?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.split_whitespace()
        .nth(1)
        .and_then(parse_version)
        .ok_or_else(|| format!("cannot read rustc's version in {s:?}"))
}

/// Writes the canary crate and runs clippy on it; `Ok(stderr)` when clippy
/// passed, `Err(stderr)` when it failed.
fn clippy_canary(dir: &Path, rust_version: (u32, u32), body: &str) -> Result<String, String> {
    std::fs::create_dir_all(dir.join("src")).map_err(|e| e.to_string())?;
    let manifest = format!(
        "[package]\nname = \"msrv-canary\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\
         rust-version = \"{}.{}\"\npublish = false\n\n[workspace]\n",
        rust_version.0, rust_version.1
    );
    std::fs::write(dir.join("Cargo.toml"), manifest).map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("src/lib.rs"),
        format!("//! MSRV canary.\n\n/// Calls an item newer than the MSRV.\n{body}"),
    )
    .map_err(|e| e.to_string())?;
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["clippy", "--quiet", "--", "-D", "clippy::incompatible_msrv"])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .output()
        .map_err(|e| format!("cargo clippy: {e}"))?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(err)
    } else {
        Err(err)
    }
}

/// Entry point of `cargo xtask msrv`.
pub fn run(args: &[String]) -> Result<(), String> {
    if let Some(a) = args.first() {
        return Err(format!(
            "unexpected argument {a:?} (usage: cargo xtask msrv)"
        ));
    }
    let manifest = std::fs::read_to_string(util::root().join("Cargo.toml"))
        .map_err(|e| format!("Cargo.toml: {e}"))?;
    let msrv = workspace_msrv(&manifest)?;
    let have = toolchain_version()?;
    println!(
        "MSRV {}.{} (workspace rust-version); toolchain {}.{}",
        msrv.0, msrv.1, have.0, have.1
    );
    let Some(&(newer, body)) = CANARIES.iter().find(|(v, _)| *v > msrv) else {
        return Err(format!(
            "no canary newer than {}.{} in xtask/src/msrv.rs: add one (an item of the next release)",
            msrv.0, msrv.1
        ));
    };
    if newer > have {
        return Err(format!(
            "the canary needs {}.{}, the toolchain is {}.{}",
            newer.0, newer.1, have.0, have.1
        ));
    }
    let dir = util::target_dir().join("msrv-canary");
    match clippy_canary(&dir, msrv, body) {
        Ok(_) => {
            return Err(format!(
                "clippy accepted an item of {}.{} under rust-version {}.{}: the MSRV check is not live",
                newer.0, newer.1, msrv.0, msrv.1
            ));
        }
        Err(e) if e.contains("incompatible_msrv") || e.contains("incompatible-msrv") => {
            println!(
                "canary: an item of {}.{} is rejected under rust-version {}.{} (incompatible_msrv)",
                newer.0, newer.1, msrv.0, msrv.1
            );
        }
        Err(e) => return Err(format!("the canary failed for another reason:\n{e}")),
    }
    clippy_canary(&dir, have, body)
        .map_err(|e| format!("the canary fails even under the toolchain's own version:\n{e}"))?;
    println!(
        "control: the same canary passes under rust-version {}.{}",
        have.0, have.1
    );
    let members = workspace_members(&manifest)?;
    for m in &members {
        let path = util::root().join(m).join("Cargo.toml");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        inherits_msrv_and_lints(&text).map_err(|e| format!("{m}/Cargo.toml: {e}"))?;
    }
    println!(
        "workspace: all {} members take rust-version and the lints (incompatible_msrv = deny) \
         from the workspace, so the clippy step rejects any std item newer than {}.{}",
        members.len(),
        msrv.0,
        msrv.1
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_workspace_rust_version_not_the_inherited_one() {
        let m = "[package]\nrust-version.workspace = true\n[workspace.package]\nrust-version = \"1.88\"\n";
        assert_eq!(workspace_msrv(m), Ok((1, 88)));
        assert!(workspace_msrv("[package]\nname = \"x\"\n").is_err());
        assert!(workspace_msrv("rust-version = \"one\"\n").is_err());
    }

    #[test]
    fn members_must_inherit_msrv_and_lints() {
        let good = "[package]\nrust-version.workspace = true\n\n[lints]\nworkspace = true\n";
        assert_eq!(inherits_msrv_and_lints(good), Ok(()));
        assert!(
            inherits_msrv_and_lints(
                "[package]\nrust-version = \"1.90\"\n[lints]\nworkspace = true\n"
            )
            .is_err()
        );
        assert!(inherits_msrv_and_lints("[package]\nrust-version.workspace = true\n").is_err());
        let ws = "[workspace]\nmembers = [\"a\", \"b\"]\n";
        assert_eq!(
            workspace_members(ws),
            Ok(vec!["a".to_string(), "b".to_string()])
        );
    }

    #[test]
    fn the_real_workspace_members_all_inherit() {
        let m = std::fs::read_to_string(util::root().join("Cargo.toml")).unwrap();
        for member in workspace_members(&m).unwrap() {
            let t = std::fs::read_to_string(util::root().join(&member).join("Cargo.toml")).unwrap();
            assert_eq!(inherits_msrv_and_lints(&t), Ok(()), "{member}");
        }
    }

    #[test]
    fn the_real_manifest_has_a_canary() {
        let m = std::fs::read_to_string(util::root().join("Cargo.toml")).unwrap();
        let msrv = workspace_msrv(&m).unwrap();
        assert!(
            CANARIES.iter().any(|(v, _)| *v > msrv),
            "add a canary newer than {msrv:?}"
        );
    }
}
