//! Every file in configs/ passes `--check` with the real binaries.

use kp5_tests::support::proxy_bin;
use std::path::PathBuf;

#[test]
fn every_shipped_config_passes_check() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let bin = if name.starts_with("agent") {
            proxy_bin().with_file_name("kp5-agent")
        } else {
            proxy_bin()
        };
        let out = std::process::Command::new(&bin)
            .arg("--config")
            .arg(&path)
            .arg("--check")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 2);
}
