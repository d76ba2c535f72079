//! The command line without root: render, layering, usage errors, completions.

mod common;

/// `shunt` with only the given variables of its own (none of the caller's SHUNT_*).
fn shunt(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = common::shunt_command();
    cmd.args(args).envs(env.iter().copied());
    cmd.output().unwrap()
}

#[test]
fn render_needs_no_root_and_no_iptables() {
    let out = shunt(&["render"], &[("PATH", "/shunt-empty-path")]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("# IPv4 rules"));
    assert!(text.contains("# IPv6 rules"));
    assert!(text.contains("-A SHUNT_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
}

#[test]
fn flag_beats_env_beats_file_beats_default() {
    let dir = std::env::temp_dir().join(format!("shunt-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(
        &file,
        "proxy_port = 17001\ninbound_port = 17006\nexclude_outbound_ports = [22, \"2222\"]\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let text = |args: &[&str], env: &[(&str, &str)]| {
        let out = shunt(args, env);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let from_file = text(&["render", "--config", f, "--ipv6", "off"], &[]);
    assert!(from_file.contains("--to-ports 17001") && from_file.contains("--to-ports 17006"));
    assert!(
        from_file.contains("--dports 22,2222 -j RETURN"),
        "{from_file}"
    );
    let from_env = text(
        &["render", "--ipv6", "off"],
        &[("SHUNT_PROXY_PORT", "16001"), ("SHUNT_CONFIG", f)],
    );
    assert!(from_env.contains("--to-ports 16001") && from_env.contains("--to-ports 17006"));
    let from_flag = text(
        &["render", "--ipv6", "off", "--proxy-port", "18001"],
        &[("SHUNT_PROXY_PORT", "16001"), ("SHUNT_CONFIG", f)],
    );
    assert!(from_flag.contains("--to-ports 18001"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn render_json_is_the_typed_plan() {
    let out = shunt(&["render", "--json", "--inbound-ports", "80"], &[]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["config"]["proxy_port"], 15001);
    assert_eq!(v["plan"]["v4"]["tables"][0]["name"], "nat");
    assert!(v["plan"]["v6"].is_object());
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["render", "--proxy-port", "x"][..],
        &["frobnicate"],
        &["render", "--no-such-flag"],
    ] {
        let out = shunt(args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "errors go to stderr");
    }
}

#[test]
fn a_bad_value_from_the_environment_or_a_file_names_its_source() {
    let err = |out: std::process::Output| {
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = err(shunt(&["render"], &[("SHUNT_PROXY_PORT", "x")]));
    assert!(
        e.contains("'x' for --proxy-port") && e.contains("environment: SHUNT_PROXY_PORT=x"),
        "{e}"
    );
    let dir = std::env::temp_dir().join(format!("shunt-cli-origin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "dns_port = \"abc\"\n").unwrap();
    let e = err(shunt(&["render", "--config", file.to_str().unwrap()], &[]));
    assert!(e.contains("config file's `dns_port` key"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    // Given as a flag: the message is enough as it is.
    let e = err(shunt(&["render", "--proxy-port", "y"], &[]));
    assert!(!e.contains("comes from"), "{e}");
}

#[test]
fn help_version_and_completions() {
    let out = shunt(&["--version"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("shunt "));
    for sub in ["render", "apply", "clean", "check"] {
        let out = shunt(&[sub, "--help"], &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Examples:"), "{sub} --help has no examples");
        assert!(
            text.contains("SHUNT_PROXY_PORT"),
            "{sub} --help does not show env names"
        );
    }
    for sh in ["bash", "zsh", "fish"] {
        let out = shunt(&["completions", sh], &[]);
        assert!(out.status.success() && out.stdout.len() > 100, "{sh}");
    }
}
