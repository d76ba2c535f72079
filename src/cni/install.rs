//! `shunt cni install` / `uninstall`: put the binary in the CNI bin dir and shunt's entry at
//! the end of the primary network's conflist, atomically and idempotently.

use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use serde_json::{json, Map, Value};

use super::splice;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no CNI network config (*.conflist, *.conf, *.json) in {0}: install the primary network plugin first")]
    NoPrimary(PathBuf),
    #[error("{path} is not a valid CNI config: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("--options must be a JSON object of capture options: {0}")]
    Options(String),
    #[error("{conf} cannot become {conflist}: that name is taken (another network's config, or a symlink) and shunt replaces neither; rename one of them or merge them into one conflist, then install again")]
    Clash { conf: PathBuf, conflist: PathBuf },
    #[error("{path}: cannot keep its owner {uid}:{gid} ({source}); run shunt cni as root or as that user")]
    Owner {
        path: PathBuf,
        uid: u32,
        gid: u32,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Permission bits and owner for a file shunt writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    pub mode: u32,
    /// `(uid, gid)`; `None`: whoever runs shunt.
    pub owner: Option<(u32, u32)>,
}

impl Perms {
    /// A file of shunt's own: `mode`, owned by whoever runs shunt.
    pub fn new(mode: u32) -> Perms {
        Perms { mode, owner: None }
    }

    /// What `meta` has, for a rewritten file: an operator's 0640 or group stays as it was.
    fn of(meta: &fs::Metadata) -> Perms {
        Perms {
            mode: meta.mode() & 0o7777,
            owner: Some((meta.uid(), meta.gid())),
        }
    }
}

/// Writes a file so that readers see the old or the new content, never a mix: a new file in
/// the same directory (one filesystem, so the rename is atomic), flushed, then renamed over the
/// target. The rename replaces a symlink at `path` itself, never the file it points to.
pub fn write_atomic(path: &Path, data: &[u8], perms: Perms) -> Result<(), InstallError> {
    stage(path, data, perms)?.replace().map_err(io(path))
}

/// The content of `path`, written and flushed beside it, not yet visible under its name; the
/// temporary file goes away with this value unless it was renamed.
struct Staged<'a> {
    tmp: PathBuf,
    path: &'a Path,
    renamed: bool,
}

fn stage<'a>(path: &'a Path, data: &[u8], perms: Perms) -> Result<Staged<'a>, InstallError> {
    let (tmp, mut f) = create_temp(path).map_err(io(path))?;
    let staged = Staged {
        tmp,
        path,
        renamed: false,
    };
    f.write_all(data).map_err(io(path))?;
    if let Some((uid, gid)) = perms.owner {
        keep_owner(&f, uid, gid).map_err(|source| InstallError::Owner {
            path: path.to_path_buf(),
            uid,
            gid,
            source,
        })?;
    }
    // After the chown, which may clear set-id bits.
    f.set_permissions(fs::Permissions::from_mode(perms.mode))
        .map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(staged)
}

impl Staged<'_> {
    /// Renames the new file over the target.
    fn replace(mut self) -> std::io::Result<()> {
        fs::rename(&self.tmp, self.path)?;
        self.renamed = true;
        sync_dir(self.path);
        Ok(())
    }

    /// Gives the new file the target's name only if nothing has it (a file, a symlink, even a
    /// dangling one): link(2) never replaces; the error is then `AlreadyExists`.
    fn publish_new(self) -> std::io::Result<()> {
        fs::hard_link(&self.tmp, self.path)?;
        sync_dir(self.path);
        Ok(())
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A rename or link survives a crash once its directory is synced; the new name is in place
/// whether or not that succeeds, so a failure here is not the write's.
fn sync_dir(path: &Path) {
    let _ = fs::File::open(parent(path)).and_then(|d| d.sync_all());
}

/// Gives the new file `uid:gid`; nothing to do (and no privilege needed) when it has them.
fn keep_owner(f: &fs::File, uid: u32, gid: u32) -> std::io::Result<()> {
    let meta = f.metadata()?;
    if (meta.uid(), meta.gid()) == (uid, gid) {
        return Ok(());
    }
    std::os::unix::fs::fchown(f, Some(uid), Some(gid))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates the file that will become `path`, beside it, under a name nobody can guess, with
/// O_CREAT|O_EXCL|O_NOFOLLOW: whatever is planted at that name (a file, a symlink to
/// /etc/shadow) makes the open fail instead of being written through; another name is tried.
fn create_temp(path: &Path) -> std::io::Result<(PathBuf, fs::File)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let names = std::iter::repeat_with(|| {
        parent(path).join(format!(".{name}.shunt-{:016x}", unpredictable()))
    });
    create_first(names.take(16))
}

/// The first of `names` that can be created new; the last "exists" error when none could.
fn create_first(names: impl Iterator<Item = PathBuf>) -> std::io::Result<(PathBuf, fs::File)> {
    let mut last = None;
    for tmp in names {
        match open_new(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into()))
}

fn open_new(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(path)
}

/// 64 bits another process cannot predict: std seeds `RandomState`'s SipHash keys from the
/// kernel's random source (and steps them for each new state), and no crate in Cargo.toml
/// offers randomness more directly.
fn unpredictable() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The content of `path` when it is a regular file; `None` for a symlink, a FIFO or a device,
/// which are never opened for reading in a way that could block or follow them.
fn read_regular(path: &Path) -> Option<Vec<u8>> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut data = Vec::new();
    f.read_to_end(&mut data).ok()?;
    Some(data)
}

/// The primary network config: the first file in name order, as container runtimes pick it.
pub fn primary_config(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let mut files: Vec<PathBuf> = fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoPrimary(conf_dir.to_path_buf()))
}

/// A network config's text, and the mode and owner to give it back with.
fn read_conf(path: &Path) -> Result<(String, Perms), InstallError> {
    let mut f = fs::File::open(path).map_err(io(path))?;
    let perms = Perms::of(&f.metadata().map_err(io(path))?);
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(io(path))?;
    Ok((text, perms))
}

fn parse_conf(path: &Path, text: &str) -> Result<Map<String, Value>, InstallError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(InstallError::Invalid {
            path: path.to_path_buf(),
            reason: "not a JSON object".into(),
        }),
        Err(e) => Err(InstallError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// A lone plugin config as a one-plugin list (what chaining needs): the list takes the
/// config's name and version, and the plugin keeps all of its keys (runtimes give each plugin
/// the list's name and version anyway). [`conflist_text`] writes the same thing.
fn as_conflist(conf: Map<String, Value>) -> Map<String, Value> {
    if conf.contains_key("plugins") {
        return conf;
    }
    let (version, name) = list_name_and_version(&conf);
    let mut list = Map::new();
    list.insert("cniVersion".into(), version);
    list.insert("name".into(), name);
    list.insert("plugins".into(), Value::Array(vec![Value::Object(conf)]));
    list
}

fn list_name_and_version(conf: &Map<String, Value>) -> (Value, Value) {
    let version = conf.get("cniVersion").cloned().unwrap_or(json!("0.3.1"));
    let name = conf.get("name").cloned();
    (version, name.unwrap_or(json!("k8s-pod-network")))
}

/// [`as_conflist`] as text: the lone config's own text is the list's one plugin, its lines
/// indented to sit in the list (a JSON string holds no raw newline, so only the spacing between
/// tokens changes).
fn conflist_text(conf: &Map<String, Value>, text: &str) -> String {
    let (version, name) = list_name_and_version(conf);
    let plugin = text.trim().replace('\n', "\n    ");
    format!(
        "{{\n  \"cniVersion\": {version},\n  \"name\": {name},\n  \"plugins\": [\n    {plugin}\n  ]\n}}\n"
    )
}

fn is_shunt(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some("shunt")
}

/// What `install` did, for the log.
#[derive(Debug, PartialEq, Eq)]
pub struct Installed {
    pub conflist: PathBuf,
    pub binary: Option<PathBuf>,
    pub changed: bool,
}

/// Adds (or updates) shunt's entry at the end of the primary conflist; a `.conf` is turned into
/// a `.conflist` next to it and the old file removed, refused when that name is taken.
/// `options` are extra keys for the entry.
///
/// Everything is decided before anything is written: a conflist shunt cannot join changes
/// nothing, not even the binary. The binary then goes first, so that no runtime reads a
/// conflist naming a plugin it cannot find.
pub fn install(
    conf_dir: &Path,
    bin_dir: Option<&Path>,
    options: &Map<String, Value>,
) -> Result<Installed, InstallError> {
    let primary = primary_config(conf_dir)?;
    let (text, perms) = read_conf(&primary)?;
    let target = primary.with_extension("conflist");
    let new_text = installed_text(&primary, &text, shunt_entry(options))?;
    let clash = || InstallError::Clash {
        conf: primary.clone(),
        conflist: target.clone(),
    };
    if target != primary && fs::symlink_metadata(&target).is_ok() {
        return Err(clash());
    }
    let binary = bin_dir.map(install_binary).transpose()?;
    let changed = target != primary || new_text.is_some();
    if target != primary {
        let text = new_text.unwrap_or(text);
        // Checked above, and again by the link: a file that appeared since is kept too.
        let staged = stage(&target, text.as_bytes(), perms)?;
        staged.publish_new().map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => clash(),
            _ => io(&target)(e),
        })?;
        fs::remove_file(&primary).map_err(io(&primary))?;
    } else if let Some(text) = new_text {
        write_atomic(&target, text.as_bytes(), perms)?;
    }
    Ok(Installed {
        conflist: target,
        binary,
        changed,
    })
}

/// shunt's conflist entry: its type, the pod-annotations capability and `options`.
fn shunt_entry(options: &Map<String, Value>) -> Map<String, Value> {
    let mut entry = Map::new();
    entry.insert("type".into(), json!("shunt"));
    entry.insert(
        "capabilities".into(),
        json!({"io.kubernetes.cri.pod-annotations": true}),
    );
    for (k, v) in options {
        entry.insert(k.clone(), v.clone());
    }
    entry
}

/// The text of `path` (which holds `text`) with shunt's `entry` last in its plugins and every
/// other byte as it was; `None` when it is there already, as it would be written.
fn installed_text(
    path: &Path,
    text: &str,
    entry: Map<String, Value>,
) -> Result<Option<String>, InstallError> {
    let before = parse_conf(path, text)?;
    let mut intended = as_conflist(before.clone());
    let plugins = intended
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| InstallError::Invalid {
            path: path.to_path_buf(),
            reason: "\"plugins\" is not a list".into(),
        })?;
    let keep: Vec<bool> = plugins.iter().map(|p| !is_shunt(p)).collect();
    plugins.retain(|p| !is_shunt(p));
    let entry = Value::Object(entry);
    plugins.push(entry.clone());
    if intended == before {
        return Ok(None);
    }
    let source = if before.contains_key("plugins") {
        text.to_string()
    } else {
        conflist_text(&before, text)
    };
    let without = remove_entries(path, &source, &keep)?;
    let spans = find_plugins(path, &without)?;
    let new = splice::append(&without, &spans, &entry);
    means(path, &new, &intended)?;
    Ok(Some(new))
}

/// `text` without the plugins whose `keep` is false.
fn remove_entries(path: &Path, text: &str, keep: &[bool]) -> Result<String, InstallError> {
    if keep.iter().all(|k| *k) {
        return Ok(text.to_string());
    }
    let spans = find_plugins(path, text)?;
    if spans.items.len() != keep.len() {
        return Err(InstallError::Invalid {
            path: path.to_path_buf(),
            reason: format!(
                "shunt read {} plugins where serde_json read {}: nothing was written (please \
                 report this, with the file)",
                spans.items.len(),
                keep.len()
            ),
        });
    }
    Ok(splice::remove(text, &spans, keep))
}

fn find_plugins(path: &Path, text: &str) -> Result<splice::Plugins, InstallError> {
    splice::find_plugins(text).map_err(|e| InstallError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The edited text must mean exactly what was intended, as serde_json reads it; otherwise
/// nothing is written.
fn means(path: &Path, text: &str, intended: &Map<String, Value>) -> Result<(), InstallError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) if m == *intended => Ok(()),
        _ => Err(InstallError::Invalid {
            path: path.to_path_buf(),
            reason: "shunt could not edit its entry without changing others: nothing was \
                     written (please report this, with the file)"
                .into(),
        }),
    }
}

/// Copies the running binary to `dir/shunt` unless the same bytes are there.
fn install_binary(dir: &Path) -> Result<PathBuf, InstallError> {
    let exe = std::env::current_exe().map_err(io(Path::new("/proc/self/exe")))?;
    let data = fs::read(&exe).map_err(io(&exe))?;
    let target = dir.join("shunt");
    if read_regular(&target).as_deref() != Some(&data[..]) {
        write_atomic(&target, &data, Perms::new(0o755))?;
    }
    Ok(target)
}

/// Removes shunt's entry from the primary conflist (and the binary, when `bin_dir` is given).
pub fn uninstall(conf_dir: &Path, bin_dir: Option<&Path>) -> Result<bool, InstallError> {
    let primary = primary_config(conf_dir)?;
    let (text, perms) = read_conf(&primary)?;
    let new_text = uninstalled_text(&primary, &text)?;
    if let Some(t) = &new_text {
        write_atomic(&primary, t.as_bytes(), perms)?;
    }
    if let Some(dir) = bin_dir {
        let bin = dir.join("shunt");
        if bin.exists() {
            fs::remove_file(&bin).map_err(io(&bin))?;
        }
    }
    Ok(new_text.is_some())
}

/// The text of `path` (which holds `text`) without shunt's entries and every other byte as it
/// was; `None` when it has none.
fn uninstalled_text(path: &Path, text: &str) -> Result<Option<String>, InstallError> {
    let mut intended = parse_conf(path, text)?;
    let Some(plugins) = intended.get_mut("plugins").and_then(Value::as_array_mut) else {
        return Ok(None);
    };
    let keep: Vec<bool> = plugins.iter().map(|p| !is_shunt(p)).collect();
    if keep.iter().all(|k| *k) {
        return Ok(None);
    }
    plugins.retain(|p| !is_shunt(p));
    let new = remove_entries(path, text, &keep)?;
    means(path, &new, &intended)?;
    Ok(Some(new))
}

/// `--options '{"exclude_outbound_cidrs": "10.0.0.0/8"}'`, checked like a CNI config would be.
pub fn parse_options(text: &str) -> Result<Map<String, Value>, InstallError> {
    let map = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(InstallError::Options("not an object".into())),
        Err(e) => return Err(InstallError::Options(e.to_string())),
    };
    let mut opts = map.clone();
    for k in ["skip_namespaces", "log_file", "log_level"] {
        opts.remove(k);
    }
    serde_json::from_value::<crate::config::RawOptions>(Value::Object(opts))
        .map_err(|e| InstallError::Options(e.to_string()))?
        .resolve()
        .map_err(|e| InstallError::Options(e.to_string()))?;
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shunt-install-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_planted_temporary_name_is_skipped_never_opened() {
        let d = scratch("planted");
        let victim = d.join("victim");
        fs::write(&victim, "secret").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        let planted = d.join(".planted");
        symlink(&victim, &planted).unwrap();
        let dangling = d.join(".dangling");
        symlink(d.join("nowhere"), &dangling).unwrap();
        let fresh = d.join(".fresh");
        let names = [planted.clone(), dangling.clone(), fresh.clone()];
        let (got, _f) = create_first(names.into_iter()).unwrap();
        assert_eq!(got, fresh);
        assert_eq!(fs::read_to_string(&victim).unwrap(), "secret");
        assert_eq!(
            fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            !d.join("nowhere").exists(),
            "a dangling symlink was followed"
        );
        let all_taken = create_first([planted.clone(), dangling].into_iter());
        assert_eq!(
            all_taken.unwrap_err().kind(),
            std::io::ErrorKind::AlreadyExists
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn publish_new_keeps_what_appeared_at_the_name() {
        let d = scratch("new");
        let path = d.join("10-bridge.conflist");
        let staged = stage(&path, b"{}", Perms::new(0o644)).unwrap();
        fs::write(&path, "theirs").unwrap();
        let e = staged.publish_new().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read_to_string(&path).unwrap(), "theirs");
        let left: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left.len(),
            1,
            "the temporary file was left behind: {left:?}"
        );
        fs::remove_file(&path).unwrap();
        stage(&path, b"{}", Perms::new(0o640))
            .unwrap()
            .publish_new()
            .unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "{}");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn stale_shunt_entries_go_and_one_is_appended_leaving_the_rest() {
        let path = Path::new("10-x.conflist");
        let text = "{\"plugins\": [ {\"type\":\"shunt\"} , {\"type\": \"a\"},\n {\"type\":\"shunt\",\"x\":1},{\"type\":\"b\"} ], \"name\":\"n\"}";
        let entry = shunt_entry(&Map::new());
        let new = installed_text(path, text, entry.clone()).unwrap().unwrap();
        assert_eq!(
            new,
            "{\"plugins\": [ {\"type\": \"a\"},{\"type\":\"b\"},{\"capabilities\":\
             {\"io.kubernetes.cri.pod-annotations\":true},\"type\":\"shunt\"} ], \"name\":\"n\"}"
        );
        assert_eq!(installed_text(path, &new, entry).unwrap(), None);
        assert_eq!(
            uninstalled_text(path, &new).unwrap().as_deref(),
            Some("{\"plugins\": [ {\"type\": \"a\"},{\"type\":\"b\"} ], \"name\":\"n\"}")
        );
        assert_eq!(
            uninstalled_text(path, r#"{"plugins": [{"type": "a"}]}"#).unwrap(),
            None
        );
        assert_eq!(
            uninstalled_text(path, r#"{"type": "bridge"}"#).unwrap(),
            None
        );
    }

    #[test]
    fn a_list_it_cannot_read_one_way_is_refused() {
        let path = Path::new("10-x.conflist");
        let twice = r#"{"plugins": [{"type": "a"}], "plugins": [{"type": "b"}]}"#;
        let e = installed_text(path, twice, shunt_entry(&Map::new())).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = installed_text(path, r#"{"plugins": "a"}"#, Map::new()).unwrap_err();
        assert!(e.to_string().contains("not a list"), "{e}");
    }

    #[test]
    fn write_atomic_replaces_a_symlink_not_its_target() {
        let d = scratch("replace");
        let victim = d.join("victim");
        fs::write(&victim, "secret").unwrap();
        let path = d.join("10-net.conflist");
        symlink(&victim, &path).unwrap();
        write_atomic(&path, b"{}", Perms::new(0o644)).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "secret");
        assert!(fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(fs::read_to_string(&path).unwrap(), "{}");
        let left: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "a temporary file was left behind: {left:?}");
        assert_eq!(read_regular(&victim).as_deref(), Some(&b"secret"[..]));
        symlink(&victim, d.join("link")).unwrap();
        assert_eq!(read_regular(&d.join("link")), None);
        let _ = fs::remove_dir_all(&d);
    }
}
