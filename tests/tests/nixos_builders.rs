//! NixOS's own boot loader builders, where a test can run one: what the agent relies on
//! in their output holds. Each test takes the builder from an environment variable and
//! is skipped (saying so) when it is unset: nixpkgs is not on the test machine.
//!
//! `THYMIS_NIXOS_EXTLINUX_BUILDER`: the built `extlinux-conf-builder.sh` of
//! `boot.loader.generic-extlinux-compatible` (a NixOS system's
//! `config.boot.loader.generic-extlinux-compatible.populateCmd` without its arguments).

use std::path::Path;
use std::process::Command;

/// A system directory with what the builders read: kernel, initrd, init, kernel-params,
/// nixos-version.
fn system(dir: &Path, name: &str) -> String {
    let s = dir.join(name);
    std::fs::create_dir_all(&s).expect("mkdir");
    for (file, text) in [
        ("kernel", format!("kernel of {name}")),
        ("initrd", format!("initrd of {name}")),
        ("init", "#!/bin/sh\n".to_owned()),
        ("kernel-params", "console=ttyAMA0 panic=10 boot.panic_on_fail".to_owned()),
        ("nixos-version", "test".to_owned()),
    ] {
        std::fs::write(s.join(file), text).expect("write");
    }
    s.display().to_string()
}

#[test]
fn nixos_extlinux_builder_writes_what_the_u_boot_backend_reads() {
    let Ok(builder) = std::env::var("THYMIS_NIXOS_EXTLINUX_BUILDER") else {
        eprintln!("skipped: THYMIS_NIXOS_EXTLINUX_BUILDER is not set (NixOS's extlinux-conf-builder.sh)");
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let systems: Vec<String> = (1..=3).map(|g| system(tmp.path(), &format!("system-{g}"))).collect();
    let (profiles, boot) = (tmp.path().join("profiles"), tmp.path().join("boot"));
    std::fs::create_dir_all(&profiles).expect("mkdir");
    for (g, s) in systems.iter().enumerate() {
        std::os::unix::fs::symlink(s, profiles.join(format!("system-{}-link", g + 1))).expect("link");
    }
    // The builder reads the profiles from /nix/var/nix/profiles: a private mount puts ours there.
    let script = format!(
        "mkdir -p /nix/var/nix/profiles && mount --bind '{}' /nix/var/nix/profiles && exec \"$0\" -t 1 -c '{}' -d '{}' -g 10",
        profiles.display(),
        systems[1],
        boot.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script, &builder])
        .output()
        .expect("unshare");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let conf = std::fs::read_to_string(boot.join("extlinux/extlinux.conf")).expect("extlinux.conf");

    // The default boots the system given with -c; every generation has a label of its
    // own, other than the default's, that the boot script can name.
    let default = thymis_uboot::default_label(&conf).expect("a DEFAULT");
    let default_entry: Vec<&str> = conf
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != format!("LABEL {default}"))
        .skip(1)
        .take_while(|l| !l.starts_with("LABEL "))
        .collect();
    assert!(default_entry.iter().any(|l| l.contains(&format!("init={}/init", systems[1]))), "{conf}");
    let mut labels = vec![];
    for s in &systems {
        let label = thymis_uboot::label_of(&conf, s).unwrap_or_else(|| panic!("no label boots {s}:\n{conf}"));
        assert!(thymis_uboot::valid_label(&label), "{label}");
        assert_ne!(label, default);
        labels.push(label);
    }
    labels.dedup();
    assert_eq!(labels.len(), systems.len(), "{labels:?}");
    // Kernels and initrds are where the entries say, relative to extlinux.conf.
    for line in conf.lines().map(str::trim) {
        if let Some(file) = line.strip_prefix("LINUX ").or_else(|| line.strip_prefix("INITRD ")) {
            assert!(boot.join("extlinux").join(file.trim()).exists(), "{file} is missing");
        }
    }
}
