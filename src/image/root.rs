//! The root image of a Nix image: one small deterministic layer that containerd unpacks, while
//! the closure itself is bind-mounted at `/nix/store` when a container is created (its view, or
//! path by path when there is no view: see `store::views`).
//!
//! The layer holds, in sorted order:
//! - `etc/passwd` (root, nobody) and `etc/group` (root, nobody), 0644 — each left out when a
//!   link is that file or `/etc` itself,
//! - `nix/store/`, 0755 and empty (the mount point),
//! - `root/`, 0700 (root's home), and `tmp/`, 1777 — each left out when a link replaces it,
//! - the spec's links as symlinks, with any missing parent directory (0755),
//! - `nix/store/<name>` as a symlink for each closure path that is itself a symlink: a bind
//!   mount cannot carry a symlink (runtimes resolve the host path first, which would reach
//!   into the host's own `/nix/store`), so those travel in the layer instead.
//!
//! Every entry is owned by 0:0 with mtime 1 and no owner names. The config carries the spec's
//! config plus the label `io.nix-cri.store-path=<top>`, so two store paths never share an image.

use std::collections::BTreeMap;
use std::path::Path;

use oci_spec::image::Config;

use super::error::ImageError;
use super::oci::{LayerWriter, OciImage};
use super::spec::{ImageConfig, NixImageSpec, RESERVED_LABEL_PREFIX};
use crate::nix::StorePath;

/// The label naming the store path an image was made from.
pub const STORE_PATH_LABEL: &str = "io.nix-cri.store-path";

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\n";

enum Entry {
    Dir(u32),
    File(u32, &'static str),
    Symlink(String),
}

/// Builds the root image of `top` as read by [`super::spec::load`]. `store_symlinks` maps the
/// base names of closure paths that are symlinks to their targets. `closure_nar_size` only
/// feeds [`OciImage::size`]; the bytes depend on `spec`, `top` and `store_symlinks` alone.
pub fn build_root_image(
    spec: &NixImageSpec,
    top: &StorePath,
    store_symlinks: &BTreeMap<String, String>,
    closure_nar_size: u64,
) -> Result<OciImage, ImageError> {
    // Keys are paths without the leading `/`; BTreeMap order puts parents first.
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    for (name, target) in store_symlinks {
        entries.insert(format!("nix/store/{name}"), Entry::Symlink(target.clone()));
    }
    for (path, target) in spec.links() {
        let relative = path.trim_start_matches('/');
        entries.insert(relative.to_owned(), Entry::Symlink(target.clone()));
    }
    let replaced = |entries: &BTreeMap<String, Entry>, path: &str| {
        entries
            .keys()
            .any(|link| path == link || path.starts_with(&format!("{link}/")))
    };
    let generated = [
        ("etc/passwd", Entry::File(0o644, PASSWD)),
        ("etc/group", Entry::File(0o644, GROUP)),
        ("nix/store", Entry::Dir(0o755)),
        ("root", Entry::Dir(0o700)),
        ("tmp", Entry::Dir(0o1777)),
    ];
    for (path, entry) in generated {
        if !replaced(&entries, path) {
            entries.insert(path.to_owned(), entry);
        }
    }
    // Parent directories of everything; links never lie under links (the spec checks).
    let parents: Vec<String> = entries
        .keys()
        .flat_map(|path| {
            path.match_indices('/')
                .map(|(i, _)| path[..i].to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    for parent in parents {
        entries.entry(parent).or_insert(Entry::Dir(0o755));
    }

    let mut layer = LayerWriter::new();
    for (path, entry) in &entries {
        match entry {
            Entry::Dir(mode) => layer.dir(path, *mode)?,
            Entry::File(mode, contents) => layer.file(path, *mode, contents.as_bytes())?,
            Entry::Symlink(target) => layer.symlink(path, Path::new(target))?,
        }
    }
    let config = oci_config(spec.config(), top)?;
    OciImage::assemble(config, vec![layer.finish()?], closure_nar_size)
}

fn oci_config(config: &ImageConfig, top: &StorePath) -> Result<Config, ImageError> {
    let mut labels: std::collections::HashMap<String, String> = config
        .labels
        .iter()
        .filter(|(k, _)| !k.starts_with(RESERVED_LABEL_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(STORE_PATH_LABEL.to_owned(), top.to_absolute_path());
    let mut out = Config::default();
    out.set_entrypoint(config.entrypoint.clone());
    out.set_cmd(config.cmd.clone());
    out.set_env((!config.env.is_empty()).then(|| config.env.clone()));
    out.set_working_dir(config.working_dir.clone());
    out.set_user(config.user.clone());
    out.set_exposed_ports(
        (!config.exposed_ports.is_empty()).then(|| config.exposed_ports.iter().cloned().collect()),
    );
    out.set_labels(Some(labels));
    out.set_stop_signal(config.stop_signal.clone());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::image::oci::{LAYER_MTIME, sha256_digest};

    const TOP: &str = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-image.json";
    const BUSYBOX: &str = "/nix/store/jsm9cyjvamk013ndqlj8ckgaqp3yrw28-busybox-static";
    const LONG: &str = "/nix/store/z0pr1h0q3wqxq58pvg74qfi04av8hcsn-fx-long-name-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

    fn top() -> StorePath {
        StorePath::from_absolute_path(TOP).unwrap()
    }

    fn spec(json: &str) -> NixImageSpec {
        let closure: BTreeSet<StorePath> = [TOP, BUSYBOX, LONG]
            .iter()
            .map(|p| StorePath::from_absolute_path(p).unwrap())
            .collect();
        NixImageSpec::from_bytes(&top(), json.as_bytes(), &closure).unwrap()
    }

    /// (path, mode, type, link target or contents) of every entry.
    fn entries(image: &OciImage) -> Vec<(String, u32, char, String)> {
        assert_eq!(image.layers().len(), 1);
        let mut archive = tar::Archive::new(&image.layers()[0].1[..]);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let h = e.header().clone();
                assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
                assert_eq!(h.mtime().unwrap(), LAYER_MTIME);
                assert_eq!(h.username().unwrap(), Some(""));
                assert_eq!(h.groupname().unwrap(), Some(""));
                let kind = match h.entry_type() {
                    tar::EntryType::Directory => 'd',
                    tar::EntryType::Regular => 'f',
                    tar::EntryType::Symlink => 'l',
                    other => panic!("unexpected entry type {other:?}"),
                };
                let detail = match kind {
                    'l' => e
                        .link_name()
                        .unwrap()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                    _ => {
                        let mut s = String::new();
                        std::io::Read::read_to_string(&mut e, &mut s).unwrap();
                        s
                    }
                };
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    kind,
                    detail,
                )
            })
            .collect()
    }

    #[test]
    fn the_root_layer_of_a_plain_path() {
        let image =
            build_root_image(&NixImageSpec::plain(&top()), &top(), &BTreeMap::new(), 1000).unwrap();
        let entries = entries(&image);
        let summary: Vec<(&str, u32, char)> = entries
            .iter()
            .map(|(p, m, k, _)| (p.as_str(), *m, *k))
            .collect();
        assert_eq!(
            summary,
            [
                ("etc/", 0o755, 'd'),
                ("etc/group", 0o644, 'f'),
                ("etc/passwd", 0o644, 'f'),
                ("nix/", 0o755, 'd'),
                ("nix/store/", 0o755, 'd'),
                ("root/", 0o700, 'd'),
                ("tmp/", 0o1777, 'd'),
            ]
        );
        assert!(entries[2].3.starts_with("root:x:0:0:"));
        assert!(entries[2].3.contains("nobody:x:65534:65534:"));
        let config: serde_json::Value = serde_json::from_slice(image.config()).unwrap();
        assert_eq!(
            config["config"]["Env"],
            serde_json::json!([format!("PATH={TOP}/bin")])
        );
        assert_eq!(config["config"]["Labels"][STORE_PATH_LABEL], TOP);
        assert!(config["config"].get("Entrypoint").is_none());
        assert!(config["config"].get("Cmd").is_none());
        assert!(image.size() > 1000);
    }

    #[test]
    fn links_and_their_parents() {
        let spec = spec(&format!(
            r#"{{"nixCriImage":0,"config":{{"Entrypoint":["/bin/sh"],"User":"65534","Labels":{{"x":"y"}}}},
                "links":{{"/bin":"{BUSYBOX}/bin","/usr/local/bin/sh":"{BUSYBOX}/bin/sh",
                          "/etc/passwd":"{BUSYBOX}/passwd","/tmp":"{BUSYBOX}/tmp",
                          "/opt/long":"{LONG}/and/a/long/way/down/to/make/the/link/target/exceed/the/hundred/bytes/of/ustar"}}}}"#
        ));
        let image = build_root_image(&spec, &top(), &BTreeMap::new(), 0).unwrap();
        let entries = entries(&image);
        let summary: Vec<(&str, u32, char)> = entries
            .iter()
            .map(|(p, m, k, _)| (p.as_str(), *m, *k))
            .collect();
        assert_eq!(
            summary,
            [
                ("bin", 0o777, 'l'),
                ("etc/", 0o755, 'd'),
                ("etc/group", 0o644, 'f'),
                ("etc/passwd", 0o777, 'l'),
                ("nix/", 0o755, 'd'),
                ("nix/store/", 0o755, 'd'),
                ("opt/", 0o755, 'd'),
                ("opt/long", 0o777, 'l'),
                ("root/", 0o700, 'd'),
                ("tmp", 0o777, 'l'),
                ("usr/", 0o755, 'd'),
                ("usr/local/", 0o755, 'd'),
                ("usr/local/bin/", 0o755, 'd'),
                ("usr/local/bin/sh", 0o777, 'l'),
            ]
        );
        assert_eq!(entries[0].3, format!("{BUSYBOX}/bin"));
        assert!(entries[7].3.starts_with(LONG));
        let config: serde_json::Value = serde_json::from_slice(image.config()).unwrap();
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(["/bin/sh"])
        );
        assert_eq!(config["config"]["User"], "65534");
        assert_eq!(config["config"]["Labels"]["x"], "y");
        assert_eq!(config["config"]["Labels"][STORE_PATH_LABEL], TOP);
    }

    #[test]
    fn a_link_at_etc_replaces_passwd_and_group() {
        let spec = spec(&format!(
            r#"{{"nixCriImage":0,"links":{{"/etc":"{BUSYBOX}/etc"}}}}"#
        ));
        let image = build_root_image(&spec, &top(), &BTreeMap::new(), 0).unwrap();
        let paths: Vec<String> = entries(&image).into_iter().map(|e| e.0).collect();
        assert_eq!(paths, ["etc", "nix/", "nix/store/", "root/", "tmp/"]);
    }

    #[test]
    fn same_inputs_same_bytes_and_digests() {
        let json = format!(
            r#"{{"nixCriImage":0,"config":{{"Cmd":["a"],"Labels":{{"a":"1","b":"2","c":"3","d":"4"}},
                "ExposedPorts":{{"1/tcp":{{}},"2/tcp":{{}},"3/udp":{{}}}}}},"links":{{"/bin":"{BUSYBOX}/bin"}}}}"#
        );
        let a = build_root_image(&spec(&json), &top(), &BTreeMap::new(), 7).unwrap();
        for _ in 0..5 {
            assert_eq!(
                a,
                build_root_image(&spec(&json), &top(), &BTreeMap::new(), 7).unwrap()
            );
        }
        assert_eq!(a.id(), sha256_digest(a.config()));
        assert_eq!(a.manifest_digest(), sha256_digest(a.manifest()));
        assert_eq!(a.layers()[0].0, sha256_digest(&a.layers()[0].1));
        // The store path is part of the identity; the NAR size is not.
        let other = StorePath::from_absolute_path(BUSYBOX).unwrap();
        assert_ne!(
            a.id(),
            build_root_image(&spec(&json), &other, &BTreeMap::new(), 7)
                .unwrap()
                .id()
        );
        assert_eq!(
            a.id(),
            build_root_image(&spec(&json), &top(), &BTreeMap::new(), 8)
                .unwrap()
                .id()
        );
        // Pinned (the config names the architecture): a change in these bytes changes every
        // image id nix-cri ever reported, so running images no longer match pulled ones.
        if cfg!(target_arch = "x86_64") {
            let plain = build_root_image(&NixImageSpec::plain(&top()), &top(), &BTreeMap::new(), 0)
                .unwrap();
            assert_eq!(plain.id(), PLAIN_AMD64_ID, "the root image format changed");
        }
    }

    const PLAIN_AMD64_ID: &str =
        "sha256:5f4b2de564623914064f679d13fb2df6f206ef67e3b58cbb1bdb02d02c2bdb6d";

    #[test]
    fn closure_paths_that_are_symlinks_travel_in_the_layer() {
        let links = BTreeMap::from([(
            "0a6n65b4mh76p9rdrsbgxxsvzgych0hv-fx-single-symlink".to_owned(),
            "/nix/store/v7x65srm7799yv36xwkjv1p1i7r7qaz3-fx-bottom/share/bottom.txt".to_owned(),
        )]);
        let plain = NixImageSpec::plain(&top());
        let with = build_root_image(&plain, &top(), &links, 0).unwrap();
        let without = build_root_image(&plain, &top(), &BTreeMap::new(), 0).unwrap();
        assert_ne!(with.id(), without.id());
        let layer = &with.layers()[0].1;
        let mut archive = tar::Archive::new(&layer[..]);
        let entry = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| {
                e.path().unwrap().to_str()
                    == Some("nix/store/0a6n65b4mh76p9rdrsbgxxsvzgych0hv-fx-single-symlink")
            })
            .expect("the store symlink is in the layer");
        assert_eq!(entry.header().entry_type(), tar::EntryType::Symlink);
        assert_eq!(
            entry.link_name().unwrap().unwrap().to_str(),
            Some("/nix/store/v7x65srm7799yv36xwkjv1p1i7r7qaz3-fx-bottom/share/bottom.txt")
        );
    }
}
