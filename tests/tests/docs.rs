//! The docs an operator relies on stay true to the code (issue 9): every
//! config key the proxy and the agent accept is in the configuration
//! reference, and the Docker files describe what the README runs.

use kp5_tests::support::proxy_bin;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Field names of every `struct Raw...` (the serde structs the TOML is read
/// into, with `deny_unknown_fields`: exactly the keys accepted).
fn raw_keys(source: &str) -> Vec<(String, String)> {
    let mut keys = Vec::new();
    let mut current: Option<String> = None;
    for line in source.lines() {
        let t = line.trim();
        if let Some(rest) = t
            .strip_prefix("pub struct Raw")
            .or_else(|| t.strip_prefix("struct Raw"))
        {
            if t.ends_with('{') {
                let name = rest.split_whitespace().next().unwrap_or("");
                current = Some(format!("Raw{name}"));
            }
            continue;
        }
        if line.starts_with('}') {
            current = None;
            continue;
        }
        let Some(s) = &current else { continue };
        if t.starts_with("//") || t.starts_with('#') {
            continue;
        }
        let t = t.strip_prefix("pub ").unwrap_or(t);
        if let Some((name, _)) = t.split_once(':') {
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                keys.push((s.clone(), name.to_owned()));
            }
        }
    }
    keys
}

#[test]
fn every_config_key_is_in_the_configuration_reference() {
    let doc = read("docs/configuration.md");
    let mut missing = Vec::new();
    let mut checked = 0;
    for file in ["proxy/src/config/raw.rs", "agent/src/config.rs"] {
        let keys = raw_keys(&read(file));
        assert!(keys.len() > 20, "{file}: found only {keys:?}");
        for (s, k) in keys {
            checked += 1;
            let shown = [
                format!("`{k}`"),
                format!("[{k}]"),
                format!("[{k}."),
                format!(".{k}]"),
                format!("{k} ="),
                format!("{{ {k},"),
            ];
            if !shown.iter().any(|p| doc.contains(p.as_str())) {
                missing.push(format!("{file}: {s}.{k}"));
            }
        }
    }
    assert!(
        checked > 60,
        "only {checked} keys found: the parser lost track"
    );
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md: {missing:#?}"
    );
}

/// The compose file parsed as YAML (by the `yaml` npm package, as Compose
/// would), with what every service needs; the configs it mounts pass
/// `--check` with the environment and flags the compose file gives them.
#[test]
fn compose_file_and_dockerfile_are_consistent_and_their_configs_pass_check() {
    let compose = root().join("docker/compose.yaml");
    let out = Command::new("node")
        .current_dir(root().join("tests/node"))
        .args([
            "-e",
            "const y=require('yaml');console.log(JSON.stringify(y.parse(require('fs').readFileSync(process.argv[1],'utf8'),{merge:true})))",
        ])
        .arg(&compose)
        .output()
        .expect("node is installed (tests/run.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let services = c["services"].as_object().expect("services");
    for s in [
        "redis", "server-1", "agent-1", "server-2", "agent-2", "proxy-1", "proxy-2",
    ] {
        assert!(services.contains_key(s), "service {s} missing");
    }
    assert!(c["services"]["redis"]["healthcheck"]["test"].is_array());

    let dockerfile = read("docker/Dockerfile");
    for target in ["proxy", "agent", "demo-server"] {
        assert!(
            dockerfile.contains(&format!("AS {target}\n")),
            "Dockerfile stage {target}"
        );
    }
    assert_eq!(
        dockerfile.matches("HEALTHCHECK").count(),
        3,
        "a health check per image"
    );
    assert!(dockerfile.contains("USER 10001:10001"), "runs as non-root");

    let agent_bin = proxy_bin().with_file_name("kp5-agent");
    for (name, svc) in services {
        if name == "redis" {
            continue;
        }
        let target = svc["build"]["target"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: build target"));
        assert!(
            dockerfile.contains(&format!("AS {target}\n")),
            "{name}: stage {target}"
        );
        let args: Vec<String> = svc["command"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: command"))
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        let env: Vec<(String, String)> = svc["environment"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        // /etc/kp5 is configs/ mounted read-only
        let args: Vec<String> = args
            .into_iter()
            .map(|a| match a.strip_prefix("/etc/kp5/") {
                Some(f) => {
                    let p = root().join("configs").join(f);
                    assert!(p.exists(), "{name}: {} is not in configs/", p.display());
                    p.display().to_string()
                }
                None => a,
            })
            .collect();
        let bin = match target {
            "proxy" => proxy_bin(),
            "agent" => {
                assert_eq!(
                    svc["network_mode"],
                    format!("service:{}", name.replace("agent", "server")),
                    "{name} is its server's sidecar"
                );
                agent_bin.clone()
            }
            _ => continue,
        };
        let out = Command::new(&bin)
            .args(&args)
            .arg("--check")
            .envs(env)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {} {args:?} --check: {}{}",
            bin.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
