//! The CNI plugin driven the way a container runtime drives it: the real reference plugins
//! (Debian's containernetworking-plugins: bridge + host-local) first, shunt chained after, in a
//! "node" namespace the test makes (so the bridge never touches the host), against a pod
//! namespace.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const CNI_BIN: &str = "/usr/lib/cni";
const GATEWAY: &str = "10.200.50.1";

fn cni_missing() -> Option<String> {
    for p in ["bridge", "host-local"] {
        if !Path::new(CNI_BIN).join(p).exists() {
            return Some(format!(
                "{CNI_BIN}/{p} missing (apt-get install containernetworking-plugins)"
            ));
        }
    }
    None
}

macro_rules! require_cni {
    () => {
        require_netns!();
        if let Some(why) = cni_missing() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

struct Runtime {
    node: Ns,
    pod: Ns,
    data: PathBuf,
    bridge: String,
    id: String,
}

struct Outcome {
    code: i32,
    stdout: Value,
    stderr: String,
}

impl Runtime {
    fn new() -> Runtime {
        let node = Ns::new("node");
        let pod = Ns::new("cnipod");
        let id = pod.name.clone();
        let data = std::env::temp_dir().join(format!("{}-ipam", pod.name));
        let n = pod.name.rsplit('-').next().unwrap_or("0").to_string();
        let bridge = format!("shb{}x{n}", std::process::id() % 10000);
        Runtime {
            node,
            pod,
            data,
            bridge,
            id,
        }
    }

    fn bridge_conf(&self) -> Value {
        json!({
            "type": "bridge", "bridge": self.bridge, "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "subnet": "10.200.50.0/24", "dataDir": self.data}
        })
    }

    /// Runs one plugin binary in the node namespace, as a runtime would exec it.
    fn exec(&self, plugin: &str, command: &str, netns: &str, conf: &Value, args: &str) -> Outcome {
        let path = if plugin == "shunt" {
            PathBuf::from(SHUNT)
        } else {
            Path::new(CNI_BIN).join(plugin)
        };
        let out = common::output_with_stdin(
            shunt::netns::command(&path.to_string_lossy(), Some(&self.node.handle))
                .env("CNI_COMMAND", command)
                .env("CNI_CONTAINERID", &self.id)
                .env("CNI_NETNS", netns)
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", CNI_BIN)
                .env("CNI_ARGS", args),
            conf.to_string().as_bytes(),
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        Outcome {
            code: out.status.code().unwrap_or(-1),
            stdout: if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{plugin} printed non-JSON ({e}): {text}"))
            },
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }

    /// One plugin's config as the runtime hands it over: the list's name and version, and the
    /// previous result.
    fn conf(&self, version: &str, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut c = plugin.clone();
        c["cniVersion"] = json!(version);
        c["name"] = json!("testnet");
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }

    /// ADD through the list in order, handing each result to the next plugin.
    fn add(&self, version: &str, plugins: &[Value], args: &str) -> Result<Value, Outcome> {
        self.add_all(version, plugins, args)
            .map(|mut r| r.pop().unwrap())
    }

    /// Like [`Runtime::add`], returning every plugin's result.
    fn add_all(&self, version: &str, plugins: &[Value], args: &str) -> Result<Vec<Value>, Outcome> {
        let mut results: Vec<Value> = Vec::new();
        for p in plugins {
            let ty = p["type"].as_str().unwrap();
            let conf = self.conf(version, p, results.last());
            let out = self.exec(ty, "ADD", &self.pod.path(), &conf, args);
            if out.code != 0 {
                return Err(out);
            }
            results.push(out.stdout);
        }
        Ok(results)
    }

    fn check(&self, version: &str, plugins: &[Value], cached: &Value) -> Result<(), Outcome> {
        for p in plugins {
            let ty = p["type"].as_str().unwrap();
            let out = self.exec(
                ty,
                "CHECK",
                &self.pod.path(),
                &self.conf(version, p, Some(cached)),
                "",
            );
            if out.code != 0 {
                return Err(out);
            }
        }
        Ok(())
    }

    /// DEL in reverse order, with the cached result.
    fn del(&self, version: &str, plugins: &[Value], cached: &Value, netns: &str) {
        for p in plugins.iter().rev() {
            let ty = p["type"].as_str().unwrap();
            let out = self.exec(ty, "DEL", netns, &self.conf(version, p, Some(cached)), "");
            assert_eq!(out.code, 0, "DEL {ty}: {} {}", out.stdout, out.stderr);
        }
    }

    fn has_rules(&self) -> bool {
        self.pod
            .iptables_save("nft", false)
            .contains("SHUNT_OUTPUT")
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn shunt_conf(extra: Value) -> Value {
    let mut c = json!({"type": "shunt", "backend": "nft", "ipv6": "off"});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

/// Where a connection from the app (uid 1000) to the gateway lands: `Some(original dst)` when
/// the pod's outbound capture port got it, `None` when the node's listener did.
fn lands(rt: &Runtime, capture: &TcpListener, node: &TcpListener, port: u16) -> Option<SocketAddr> {
    let _c = rt
        .pod
        .connect_as(1000, 1000, &hp(GATEWAY, port))
        .expect("connect");
    for _ in 0..1000 {
        if let Ok((s, _)) = capture.accept() {
            return Some(original_dst(&s));
        }
        if node.accept().is_ok() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    panic!("connection to {GATEWAY}:{port} landed nowhere");
}

fn listeners(rt: &Runtime, ports: &[u16]) -> (TcpListener, Vec<TcpListener>) {
    let capture = rt.pod.listen("[::]:15001");
    capture.set_nonblocking(true).unwrap();
    let nodes = ports
        .iter()
        .map(|p| {
            let l = rt.node.listen(&hp(GATEWAY, *p));
            l.set_nonblocking(true).unwrap();
            l
        })
        .collect();
    (capture, nodes)
}

#[test]
fn chained_after_bridge_for_each_cni_version() {
    require_cni!();
    for version in ["0.3.1", "0.4.0", "1.0.0"] {
        let rt = Runtime::new();
        let plugins = [rt.bridge_conf(), shunt_conf(json!({}))];
        let results = rt
            .add_all(
                version,
                &plugins,
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
            )
            .unwrap_or_else(|o| panic!("{version}: {} {}", o.stdout, o.stderr));
        let (bridge, result) = (&results[0], results[1].clone());
        assert_eq!(result["cniVersion"], version);
        assert!(
            result["interfaces"]
                .as_array()
                .is_some_and(|a| a.len() >= 2),
            "{result}"
        );
        assert!(result["ips"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with("10.200.50."));
        assert_eq!(
            &result, bridge,
            "{version}: the bridge's result must pass through unchanged"
        );
        assert!(rt.has_rules(), "{version}: no rules in the pod");
        let (capture, nodes) = listeners(&rt, &[8080]);
        assert_eq!(
            lands(&rt, &capture, &nodes[0], 8080),
            Some(format!("{GATEWAY}:8080").parse().unwrap()),
            "{version}: the app's connection was not captured"
        );
        if version != "0.3.1" {
            rt.check(version, &plugins, &result)
                .unwrap_or_else(|o| panic!("{} {}", o.stdout, o.stderr));
            rt.pod.must(&[
                "iptables-nft",
                "-t",
                "nat",
                "-D",
                "OUTPUT",
                "-p",
                "tcp",
                "-j",
                "SHUNT_OUTPUT",
            ]);
            let err = rt
                .check(version, &plugins, &result)
                .expect_err("CHECK must fail after drift");
            assert_eq!(err.stdout["code"], 100, "{}", err.stdout);
            assert!(err.stdout["msg"].as_str().unwrap().contains("drifted"));
        }
        rt.del(version, &plugins, &result, &rt.pod.path());
        assert!(!rt.has_rules(), "{version}: DEL left rules");
        rt.del(version, &plugins[1..], &result, &rt.pod.path());
    }
}

#[test]
fn the_nftables_engine_through_add_check_and_del() {
    require_cni!();
    let rt = Runtime::new();
    // The priority offset as a JSON number, as a CNI config would write it.
    let plugins = [
        rt.bridge_conf(),
        shunt_conf(json!({"backend": "nftables", "nft_priority_offset": 10})),
    ];
    let results = rt
        .add_all("1.0.0", &plugins, "IgnoreUnknown=1")
        .unwrap_or_else(|o| panic!("{} {}", o.stdout, o.stderr));
    let result = results[1].clone();
    let table = rt.pod.must(&["nft", "list", "table", "inet", "shunt"]);
    assert!(table.contains("v4_nat_SHUNT_OUTPUT"), "{table}");
    assert!(table.contains("priority -90;"), "{table}");
    assert!(!rt.pod.iptables_save("nft", false).contains("SHUNT_"));
    let (capture, nodes) = listeners(&rt, &[8080]);
    assert_eq!(
        lands(&rt, &capture, &nodes[0], 8080),
        Some(format!("{GATEWAY}:8080").parse().unwrap()),
        "the app's connection was not captured"
    );
    rt.check("1.0.0", &plugins, &result)
        .unwrap_or_else(|o| panic!("{} {}", o.stdout, o.stderr));
    rt.pod.must(&[
        "nft",
        "flush",
        "chain",
        "inet",
        "shunt",
        "v4_nat_SHUNT_OUTBOUND",
    ]);
    let err = rt
        .check("1.0.0", &plugins, &result)
        .expect_err("CHECK must fail after drift");
    assert_eq!(err.stdout["code"], 100, "{}", err.stdout);
    rt.del("1.0.0", &plugins, &result, &rt.pod.path());
    let gone = rt.pod.exec(&["nft", "list", "table", "inet", "shunt"]);
    assert!(!gone.status.success(), "DEL left the table");
}

#[test]
fn del_succeeds_when_the_namespace_is_gone() {
    require_cni!();
    let rt = Runtime::new();
    let plugins = [rt.bridge_conf(), shunt_conf(json!({}))];
    let result = rt
        .add("1.0.0", &plugins, "")
        .unwrap_or_else(|o| panic!("{}", o.stderr));
    let gone = format!("/run/netns/{}-gone", rt.pod.name);
    let out = rt.exec(
        "shunt",
        "DEL",
        &gone,
        &rt.conf("1.0.0", &plugins[1], Some(&result)),
        "",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = rt.exec(
        "shunt",
        "DEL",
        "",
        &rt.conf("1.0.0", &plugins[1], Some(&result)),
        "",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
}

#[test]
fn bad_config_fails_add_with_code_7_and_applies_nothing() {
    require_cni!();
    let rt = Runtime::new();
    let plugins = [
        rt.bridge_conf(),
        shunt_conf(json!({"exclude_outbound_cidrs": ["10.0.0.0/33"]})),
    ];
    let err = rt.add("1.0.0", &plugins, "").expect_err("ADD must fail");
    assert_eq!(err.code, 1);
    assert_eq!(err.stdout["code"], 7, "{}", err.stdout);
    assert!(
        err.stdout["msg"].as_str().unwrap().contains("10.0.0.0/33"),
        "{}",
        err.stdout
    );
    assert!(!rt.has_rules());
    // First in the list (no prevResult): a clear error, nothing applied.
    let out = rt.exec(
        "shunt",
        "ADD",
        &rt.pod.path(),
        &rt.conf("1.0.0", &shunt_conf(json!({})), None),
        "",
    );
    assert_eq!(out.stdout["code"], 7);
    assert!(out.stdout["msg"].as_str().unwrap().contains("prevResult"));
    assert!(!rt.has_rules());
}

#[test]
fn annotations_opt_out_and_override() {
    require_cni!();
    let annotated = |ann: Value| {
        shunt_conf(json!({
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
            "runtimeConfig": {"io.kubernetes.cri.pod-annotations": ann}
        }))
    };
    // Opt-out: the pod gets its network but no rules.
    let rt = Runtime::new();
    let plugins = [
        rt.bridge_conf(),
        annotated(json!({"shunt.dev/inject": "false"})),
    ];
    let result = rt
        .add("1.0.0", &plugins, "")
        .unwrap_or_else(|o| panic!("{}", o.stderr));
    assert!(result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .starts_with("10.200.50."));
    assert!(!rt.has_rules());
    // skip_namespaces (kube-system by default) does the same.
    let rt = Runtime::new();
    let plugins = [rt.bridge_conf(), shunt_conf(json!({}))];
    rt.add(
        "1.0.0",
        &plugins,
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns",
    )
    .unwrap_or_else(|o| panic!("{} {}", o.stdout, o.stderr));
    assert!(!rt.has_rules());
    // Override: port 8080 excluded for this pod only; 8081 still captured.
    let rt = Runtime::new();
    let plugins = [
        rt.bridge_conf(),
        annotated(json!({"shunt.dev/exclude-outbound-ports": "8080"})),
    ];
    rt.add("1.0.0", &plugins, "")
        .unwrap_or_else(|o| panic!("{}", o.stderr));
    let (capture, nodes) = listeners(&rt, &[8080, 8081]);
    assert_eq!(lands(&rt, &capture, &nodes[0], 8080), None);
    assert_eq!(
        lands(&rt, &capture, &nodes[1], 8081),
        Some(format!("{GATEWAY}:8081").parse().unwrap())
    );
}

#[test]
fn version_lists_supported_versions() {
    let out = common::shunt_command()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shunt-cni-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("net.d")).unwrap();
    std::fs::create_dir_all(d.join("bin")).unwrap();
    d
}

fn cni_cmd(verb: &str, d: &Path, extra: &[&str]) {
    let out = common::shunt_command()
        .args(["cni", verb, "--conf-dir"])
        .arg(d.join("net.d"))
        .arg("--bin-dir")
        .arg(d.join("bin"))
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn shunt_entries(v: &Value) -> usize {
    v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "shunt")
        .count()
}

#[test]
fn install_and_uninstall_a_conflist() {
    let d = tmpdir("list");
    let primary = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
        {"type": "calico", "ipam": {"type": "calico-ipam"}},
        {"type": "portmap", "capabilities": {"portMappings": true}}]});
    let path = d.join("net.d/10-calico.conflist");
    std::fs::write(&path, primary.to_string()).unwrap();
    std::fs::write(d.join("net.d/99-other.conflist"), "{}").unwrap();
    for _ in 0..3 {
        cni_cmd(
            "install",
            &d,
            &[
                "--options",
                r#"{"exclude_outbound_cidrs": "169.254.169.254/32"}"#,
            ],
        );
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(shunt_entries(&v), 1, "{v}");
    assert_eq!(v["plugins"][2]["type"], "shunt", "appended last: {v}");
    assert_eq!(
        v["plugins"][2]["exclude_outbound_cidrs"],
        "169.254.169.254/32"
    );
    assert_eq!(v["plugins"][0], primary["plugins"][0]);
    assert!(d.join("bin/shunt").exists());
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(d.join("net.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    cni_cmd("uninstall", &d, &[]);
    cni_cmd("uninstall", &d, &[]);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v, primary);
    assert!(!d.join("bin/shunt").exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn install_turns_a_lone_conf_into_a_conflist() {
    let d = tmpdir("conf");
    let conf = json!({"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge", "bridge": "cni0",
        "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}});
    std::fs::write(d.join("net.d/10-bridge.conf"), conf.to_string()).unwrap();
    cni_cmd("install", &d, &[]);
    cni_cmd("install", &d, &[]);
    assert!(!d.join("net.d/10-bridge.conf").exists());
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("net.d/10-bridge.conflist")).unwrap())
            .unwrap();
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(v["name"], "bridge-net");
    // The config itself, every key kept, is the list's first plugin.
    assert_eq!(v["plugins"][0], conf);
    assert_eq!(shunt_entries(&v), 1);
    // Bad options are refused before anything is written.
    let out = common::shunt_command()
        .args(["cni", "install", "--conf-dir"])
        .arg(d.join("net.d"))
        .arg("--bin-dir")
        .arg(d.join("bin"))
        .args(["--options", r#"{"proxy_port": 0}"#])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxy-port"));
    let _ = std::fs::remove_dir_all(&d);
}

/// The plugin alone, as a runtime calls it: `CNI_COMMAND`, a config on stdin, and `env` on
/// top of this process's environment less any `CNI_*` variable of its own.
fn plugin(cmd: &str, conf: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut command = common::shunt_command();
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CNI_") {
            command.env_remove(k);
        }
    }
    common::output_with_stdin(
        command.env("CNI_COMMAND", cmd).envs(env.iter().copied()),
        conf.as_bytes(),
    )
}

/// The CNI error JSON a failed plugin printed, checked to come with exit status 1.
fn cni_error(out: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not a CNI error ({e}): {stdout}"))
}

#[test]
fn status_and_gc_for_cni_1_1() {
    let run = |cmd: &str, conf: &str, path: &str| plugin(cmd, conf, &[("PATH", path)]);
    let conf = json!({"cniVersion": "1.1.0", "name": "n", "type": "shunt"}).to_string();
    let path = std::env::var("PATH").unwrap_or_default();
    let ok = run("STATUS", &conf, &path);
    assert!(
        ok.status.success() && ok.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert!(run("GC", &conf, &path).status.success());
    // Without iptables the plugin cannot serve pods: CNI's "plugin not available" (50).
    let down = run("STATUS", &conf, "/shunt-empty-path");
    assert_eq!(down.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&down.stdout).unwrap();
    assert_eq!(v["code"], 50);
    // An unsupported version is refused with code 1, for any command.
    let old = r#"{"cniVersion":"0.2.0","name":"n","type":"shunt"}"#;
    let out = run("ADD", old, &path);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["code"], 1, "{v}");
}

/// A file that must survive: its content and mode are checked with [`assert_untouched`].
fn victim(dir: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, format!("secret {name}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn assert_untouched(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let name = p.file_name().unwrap().to_string_lossy();
    let meta = std::fs::symlink_metadata(p).unwrap();
    assert!(
        meta.is_file(),
        "{} is no longer a regular file",
        p.display()
    );
    let data = std::fs::read(p).unwrap();
    assert!(
        data == format!("secret {name}\n").as_bytes(),
        "{} was written through a symlink: {} bytes now",
        p.display(),
        data.len()
    );
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o600,
        "{}: mode changed through a symlink",
        p.display()
    );
}

/// Plants a symlink at `at` pointing to a fresh victim file named `name`.
fn plant(at: &Path, victims: &Path, name: &str) -> PathBuf {
    let v = victim(victims, name);
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(&v, at).unwrap();
    v
}

#[test]
fn install_and_uninstall_never_write_through_symlinks() {
    // In-process, so the temporary names an older shunt derived from its pid are predictable
    // here: a symlink is planted at each of them, and at every path install and uninstall
    // write or remove.
    let d = tmpdir("links");
    let (net, bin, victims) = (d.join("net.d"), d.join("bin"), d.join("victims"));
    let pid = std::process::id();
    let list = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network",
        "plugins": [{"type": "calico"}]});
    // The primary conflist itself is a symlink to a file kept elsewhere.
    let elsewhere = victims.join("real.conflist");
    std::fs::create_dir_all(&victims).unwrap();
    std::fs::write(&elsewhere, list.to_string()).unwrap();
    std::os::unix::fs::symlink(&elsewhere, net.join("10-calico.conflist")).unwrap();
    let mut planted = vec![
        plant(&bin.join("shunt"), &victims, "bin"),
        plant(
            &bin.join(format!(".shunt.shunt-tmp-{pid}")),
            &victims,
            "bin-tmp",
        ),
        plant(
            &net.join(format!(".10-calico.conflist.shunt-tmp-{pid}")),
            &victims,
            "conf-tmp",
        ),
    ];
    let done =
        shunt::cni::install::install(&net, Some(&bin), &serde_json::Map::new()).expect("install");
    assert!(done.changed);
    for v in &planted {
        assert_untouched(v);
    }
    assert_eq!(
        std::fs::read_to_string(&elsewhere).unwrap(),
        list.to_string(),
        "the symlinked conflist's target was written"
    );
    let installed = net.join("10-calico.conflist");
    assert!(std::fs::symlink_metadata(&installed).unwrap().is_file());
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&installed).unwrap()).unwrap();
    assert_eq!(shunt_entries(&v), 1, "{v}");
    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert!(std::fs::read(bin.join("shunt")).unwrap() == exe);

    planted.push(plant(&bin.join("shunt"), &victims, "bin-again"));
    planted.push(plant(
        &net.join(format!(".10-calico.conflist.shunt-tmp-{pid}")),
        &victims,
        "conf-tmp-again",
    ));
    assert!(shunt::cni::install::uninstall(&net, Some(&bin)).expect("uninstall"));
    for v in &planted {
        assert_untouched(v);
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&installed).unwrap()).unwrap();
    assert_eq!(v, list);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn plugin_log_file_is_private_and_never_followed() {
    use std::os::unix::fs::PermissionsExt;
    let d = tmpdir("log");
    let victims = d.join("victims");
    // Any command that logs: an unsupported version is an error, logged before the reply.
    let conf = |log: &Path| {
        json!({"cniVersion": "0.2.0", "name": "n", "type": "shunt", "log_file": log}).to_string()
    };
    let log = d.join("plugin.log");
    let out = plugin("ADD", &conf(&log), &[]);
    assert_eq!(out.status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("not supported"), "{text}");
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "a new log file is readable by others: {mode:o}"
    );
    let link = d.join("planted.log");
    let v = plant(&link, &victims, "log");
    let out = plugin("ADD", &conf(&link), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_untouched(&v);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("planted.log") && stderr.contains("not supported"),
        "the refused log file is named and the log goes to stderr: {stderr}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// `shunt cni install|uninstall` on `d`, returning the exit code and stderr.
fn cni_try(verb: &str, d: &Path) -> (Option<i32>, String) {
    let out = common::shunt_command()
        .args(["cni", verb, "--conf-dir"])
        .arg(d.join("net.d"))
        .arg("--bin-dir")
        .arg(d.join("bin"))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every file under `dir` (one level) with its size and a digest of its content, to compare
/// before and after (a binary's bytes would make an unreadable assertion message).
fn snapshot(dir: &Path) -> Vec<(String, usize, u64)> {
    use std::hash::{Hash, Hasher};
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let data = std::fs::read(e.path()).unwrap_or_default();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            data.hash(&mut h);
            let name = e.file_name().to_string_lossy().into_owned();
            (name, data.len(), h.finish())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn install_keeps_the_conflists_mode_and_owner() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: chown needs root");
        return;
    }
    let meta = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.permissions().mode() & 0o7777, m.uid(), m.gid())
    };
    let set = |p: &Path, mode: u32, uid: u32, gid: u32| {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let d = tmpdir("owner");
    let path = d.join("net.d/10-calico.conflist");
    let list = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network",
        "plugins": [{"type": "calico"}]});
    std::fs::write(&path, list.to_string()).unwrap();
    set(&path, 0o640, 1234, 5678);
    cni_cmd("install", &d, &[]);
    assert_eq!(meta(&path), (0o640, 1234, 5678), "install");
    cni_cmd("uninstall", &d, &[]);
    assert_eq!(meta(&path), (0o640, 1234, 5678), "uninstall");
    let _ = std::fs::remove_dir_all(&d);
    // A lone .conf: the .conflist made from it takes its mode and owner.
    let d = tmpdir("owner-conf");
    let conf = d.join("net.d/10-bridge.conf");
    std::fs::write(
        &conf,
        json!({"cniVersion": "0.4.0", "name": "b", "type": "bridge"}).to_string(),
    )
    .unwrap();
    set(&conf, 0o600, 4321, 8765);
    cni_cmd("install", &d, &[]);
    assert_eq!(
        meta(&d.join("net.d/10-bridge.conflist")),
        (0o600, 4321, 8765)
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_bad_conflist_changes_nothing() {
    for (i, bad) in [
        "{",
        "[]",
        r#"{"cniVersion": "1.0.0", "name": "n", "plugins": {"type": "calico"}}"#,
    ]
    .into_iter()
    .enumerate()
    {
        let d = tmpdir(&format!("bad{i}"));
        std::fs::write(d.join("net.d/10-calico.conflist"), bad).unwrap();
        let (net, bin) = (snapshot(&d.join("net.d")), snapshot(&d.join("bin")));
        let (code, stderr) = cni_try("install", &d);
        assert_eq!(code, Some(1), "{bad}: {stderr}");
        assert!(stderr.contains("10-calico.conflist"), "{bad}: {stderr}");
        assert_eq!(
            snapshot(&d.join("net.d")),
            net,
            "{bad}: the conf dir changed"
        );
        assert_eq!(
            snapshot(&d.join("bin")),
            bin,
            "{bad}: the binary was installed for a conflist that cannot take it"
        );
        // An older binary already there stays as it was, too.
        std::fs::write(d.join("bin/shunt"), "old").unwrap();
        let (code, _) = cni_try("install", &d);
        assert_eq!(code, Some(1));
        assert_eq!(std::fs::read_to_string(d.join("bin/shunt")).unwrap(), "old");
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn converting_a_conf_never_replaces_another_networks_conflist() {
    let d = tmpdir("clash");
    let conf = d.join("net.d/10-bridge.conf");
    let other = d.join("net.d/10-bridge.conflist");
    std::fs::write(
        &conf,
        json!({"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge"}).to_string(),
    )
    .unwrap();
    std::fs::write(
        &other,
        json!({"cniVersion": "1.0.0", "name": "other-net", "plugins": [{"type": "ptp"}]})
            .to_string(),
    )
    .unwrap();
    let refused = |why: &str| {
        let (net, bin) = (snapshot(&d.join("net.d")), snapshot(&d.join("bin")));
        let (code, stderr) = cni_try("install", &d);
        assert_eq!(code, Some(1), "{why}: {stderr}");
        assert!(
            stderr.contains(&format!("{} ", conf.display()))
                && stderr.contains(&other.display().to_string()),
            "{why}: the error names both files: {stderr}"
        );
        assert_eq!(snapshot(&d.join("net.d")), net, "{why}: a config changed");
        assert_eq!(snapshot(&d.join("bin")), bin, "{why}: the binary changed");
    };
    refused("another network's conflist");
    // A symlink at that name is refused the same way, and what it points to is kept.
    std::fs::remove_file(&other).unwrap();
    let v = plant(&other, &d.join("victims"), "conflist");
    refused("a symlink");
    assert_untouched(&v);
    std::fs::remove_file(&other).unwrap();
    std::os::unix::fs::symlink(d.join("nowhere"), &other).unwrap();
    refused("a dangling symlink");
    assert!(!d.join("nowhere").exists());
    let _ = std::fs::remove_dir_all(&d);
}

/// A conflist as people write them: keys in no order, odd spacing, a tab, escaped quotes and
/// brackets inside strings, nested arrays, an exponent, non-ASCII, trailing whitespace.
const HAND_WRITTEN: &str = r#"{ "name" :"k8s-pod-network",   "cniVersion":"1.0.0",
	"plugins" : [
    {   "type":"calico", "log_level" : "info",
        "ipam":{"type":"calico-ipam","assign_ipv4" : "true"}, "nested": [[1, 2],[3, [4, {"plugins": []}]]],
        "note": "a \"quoted\" ] } [ , value\\", "é": "ünïcode"
    }  ,
    {"type":"portmap","snat":true,"capabilities":{"portMappings":true}}
  ],
  "zz": 1.50e3 }  
"#;

/// The one chunk `new` has that `old` has not; panics unless `new` is `old` with one insertion.
fn inserted(old: &str, new: &str) -> String {
    let (a, b) = (old.as_bytes(), new.as_bytes());
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    assert_eq!(
        prefix + suffix,
        a.len(),
        "bytes outside shunt's entry changed:\n--- before\n{old}\n--- after\n{new}"
    );
    String::from_utf8_lossy(&b[prefix..b.len() - suffix]).into_owned()
}

#[test]
fn install_changes_only_shunts_entry_and_uninstall_gives_the_file_back() {
    let d = tmpdir("bytes");
    let path = d.join("net.d/10-calico.conflist");
    std::fs::write(&path, HAND_WRITTEN).unwrap();
    let original: Value = serde_json::from_str(HAND_WRITTEN).unwrap();
    let read = || std::fs::read_to_string(&path).unwrap();
    let install = |cidr: &str| {
        let opts = json!({"exclude_outbound_cidrs": cidr}).to_string();
        cni_cmd("install", &d, &["--options", &opts]);
    };
    install("169.254.169.254/32");
    let once = read();
    let chunk = inserted(HAND_WRITTEN, &once);
    assert!(chunk.contains(r#""shunt""#), "{chunk}");
    let v: Value = serde_json::from_str(&once).unwrap();
    let plugins = v["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 3);
    assert_eq!(plugins[..2], original["plugins"].as_array().unwrap()[..]);
    assert_eq!(plugins[2]["exclude_outbound_cidrs"], "169.254.169.254/32");
    install("169.254.169.254/32");
    assert_eq!(read(), once, "a second install changed the file");
    // New options: shunt's entry changes, nothing else does.
    install("10.0.0.0/8");
    let chunk = inserted(HAND_WRITTEN, &read());
    assert!(chunk.contains("10.0.0.0/8"), "{chunk}");
    cni_cmd("uninstall", &d, &[]);
    assert_eq!(read(), HAND_WRITTEN, "uninstall did not give the file back");
    cni_cmd("uninstall", &d, &[]);
    assert_eq!(read(), HAND_WRITTEN);
    let _ = std::fs::remove_dir_all(&d);
}

/// shunt's entry as the runtime hands it over for one ADD, CHECK or DEL.
fn plugin_conf(prev: Option<Value>) -> String {
    let mut c = shunt_conf(json!({"cniVersion": "1.0.0", "name": "testnet"}));
    if let Some(p) = prev {
        c["prevResult"] = p;
    }
    c.to_string()
}

fn bridge_result() -> Value {
    json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
        "ips": [{"address": "10.200.50.2/24", "interface": 0}]})
}

#[test]
fn commands_without_the_variables_the_spec_requires_fail_with_code_4() {
    require_netns!();
    let pod = Ns::new("cnienv");
    let netns = pod.path();
    let all = [
        ("CNI_CONTAINERID", "c-1"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let has_rules = || pod.iptables_save("nft", false).contains("SHUNT_OUTPUT");
    let conf = plugin_conf(Some(bridge_result()));
    // The spec's required parameters: all three for ADD and CHECK; DEL may lack CNI_NETNS.
    for (cmd, required) in [
        ("ADD", &all[..]),
        ("CHECK", &all[..]),
        ("DEL", &[all[0], all[2]][..]),
    ] {
        for (missing, _) in required {
            for unset in [true, false] {
                let mut env: Vec<_> = all.iter().filter(|(k, _)| k != missing).copied().collect();
                if !unset {
                    env.push((missing, ""));
                }
                let v = cni_error(&plugin(cmd, &conf, &env));
                assert_eq!(v["code"], 4, "{cmd} without {missing}: {v}");
                assert!(
                    v["msg"].as_str().unwrap().contains(missing),
                    "{cmd}: the message names {missing}: {v}"
                );
                assert_eq!(v["cniVersion"], "1.0.0");
                assert!(!has_rules(), "{cmd} without {missing} applied rules");
            }
        }
    }
    // With all of them, ADD applies and passes the result on; DEL needs no CNI_NETNS.
    let out = plugin("ADD", &conf, &all);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        bridge_result()
    );
    assert!(has_rules());
    let out = plugin("DEL", &conf, &[all[0], all[2]]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_prev_result_that_is_not_an_object_is_refused_with_code_6() {
    require_netns!();
    let pod = Ns::new("cniprev");
    let netns = pod.path();
    let env = [
        ("CNI_CONTAINERID", "c-1"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    for prev in [json!("x"), json!([bridge_result()]), json!(1), json!(false)] {
        for cmd in ["ADD", "CHECK"] {
            let v = cni_error(&plugin(cmd, &plugin_conf(Some(prev.clone())), &env));
            assert_eq!(v["code"], 6, "{cmd} with prevResult {prev}: {v}");
            assert!(v["msg"].as_str().unwrap().contains("prevResult"), "{v}");
            assert!(
                !pod.iptables_save("nft", false).contains("SHUNT_OUTPUT"),
                "{cmd} with prevResult {prev} applied rules"
            );
        }
    }
    // null is no result at all: a chained plugin's "no prevResult" (7), as when it is absent.
    let v = cni_error(&plugin("ADD", &plugin_conf(Some(Value::Null)), &env));
    assert_eq!(v["code"], 7, "{v}");
}
