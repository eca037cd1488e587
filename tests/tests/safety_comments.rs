//! The line directly above every `unsafe` block and `unsafe impl` in the
//! repository is a `// SAFETY:` line (the rule and the scanner are in
//! `tests/src/safety_comments.rs`, whose unit tests show that it fails).

use std::path::Path;

/// Folders not checked, relative to the repository root (none: every
/// crate follows the rule).
const NOT_YET: &[&str] = &[];

#[test]
fn every_unsafe_block_has_its_claim_right_above() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let report = tests::safety_comments::check_tree(&root, NOT_YET).expect("readable sources");
    assert!(
        report.errors.is_empty(),
        "{} unsafe blocks or impls without a `// SAFETY:` line right above:\n{}",
        report.errors.len(),
        report.errors.join("\n")
    );
    // The walk must have found the device wrappers' and the ring's blocks,
    // not an empty tree.
    assert!(
        report.sites > 80 && report.files > 10,
        "only {} unsafe sites in {} files: is the walk broken?",
        report.sites,
        report.files
    );
}
