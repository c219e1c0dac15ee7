//! Transfer: our deployment against `nix copy --to ssh-ng://` (plain and compressed) to
//! the same device behind a shaped link.

use crate::*;

/// A deployment of variant `v` to d1, its configuration built beforehand (the baselines
/// copy a closure that is already built): returns the time and bytes until the device
/// reported its activation (as the baselines end when the copy is done), the time until
/// the deployment was confirmed, and the child's JSON.
pub(crate) fn ours(f: &Fleet, v: &str) -> (Sample, f64, Value) {
    set_variant(f, v);
    let b = f.controller.ctl_json(&["build", "bench", "--wait"]);
    assert_eq!(b["result"], "succeeded", "bench build failed: {b}");
    let before = f.device("d1").link_bytes();
    let t0 = Instant::now();
    let started = f.controller.ctl_json(&["deploy", "--device", "d1"]);
    let id = started["id"].as_i64().expect("task id");
    let mut activated: Option<Sample> = None;
    // Polled over one kept-alive HTTP connection: a process per poll (curl) would take
    // a core of this machine away from the deployment it measures.
    let http = http_agent();
    let (url, auth) =
        (format!("{}/api/v1/tasks/{id}", f.controller.base_url()), format!("Bearer {}", f.controller.token()));
    loop {
        let t: Value = http
            .get(&url)
            .header("Authorization", &auth)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json().ok())
            .unwrap_or_default();
        let child = &t["children"][0];
        if activated.is_none() && (child["phase"] == "confirm" || !child["result"].is_null()) {
            activated =
                Some(Sample { secs: t0.elapsed().as_secs_f64(), wire: (f.device("d1").link_bytes() - before) as f64 });
        }
        if !child["result"].is_null() {
            assert_eq!(child["result"], "succeeded", "bench deployment failed: {t}\n{}", f.diagnostics());
            let confirmed = t0.elapsed().as_secs_f64();
            return (activated.unwrap_or_default(), confirmed, child.clone());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) struct Sshd {
    pub(crate) child: Child,
    pub(crate) dir: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// sshd inside the device's namespaces, serving its store through `nix-daemon --stdio`.
pub(crate) fn sshd(f: &Fleet) -> Sshd {
    let dev = f.device("d1");
    let dir = f.tmp.path().join("ssh");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for k in ["hostkey", "id"] {
        sh(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(dir.join(k)));
    }
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).expect("keys");
    let conf = format!(
        "Port 2222\nListenAddress {}\nHostKey {}\nPermitRootLogin yes\nAuthorizedKeysFile {}\nStrictModes no\nUsePAM no\nPidFile none\nPasswordAuthentication no\n",
        dev.address(),
        dir.join("hostkey").display(),
        dir.join("authorized_keys").display()
    );
    std::fs::write(dir.join("sshd_config"), conf).expect("conf");
    let script = format!(
        "mount --bind '{}' /nix && mount -t tmpfs tmpfs /run && mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e -f '{}'",
        dev.nix_dir().display(),
        dir.join("sshd_config").display()
    );
    let child = Command::new("ip")
        .args(["netns", "exec", &dev.netns, "unshare", "--mount", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sshd");
    std::thread::sleep(Duration::from_secs(1));
    Sshd { child, dir }
}

pub(crate) fn nix_copy(f: &Fleet, ssh: &Sshd, system: &str, compress: bool) -> Sample {
    let dev = f.device("d1");
    let url = format!("ssh-ng://root@{}{}", dev.address(), if compress { "?compress=true" } else { "" });
    let opts = format!(
        "-i {} -p 2222 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        ssh.dir.join("id").display()
    );
    let before = dev.link_bytes();
    let t0 = Instant::now();
    sh(Command::new("nix").args(["copy", "--no-check-sigs", "--to", &url, system]).env("NIX_SSHOPTS", &opts));
    Sample { secs: t0.elapsed().as_secs_f64(), wire: (dev.link_bytes() - before) as f64 }
}

pub(crate) fn transfer(rows: &mut Vec<String>) {
    let mut f =
        Fleet::new(FleetOptions { confirm_timeout: 60, reply_timeout: 300, dead_after: 20, ..Default::default() })
            .expect("fleet");
    install_project(&f);
    f.add_device("d1", "bench", true).expect("device");
    f.wait_online("d1");
    let ssh = sshd(&f);
    let cases: [(&str, Option<&str>, &str); 4] = [
        ("full copy to an empty device", None, "base"),
        ("one component modified", Some("base"), "modified"),
        ("one component replaced", Some("base"), "replaced"),
        ("no-op (device has everything)", Some("base"), "base"),
    ];
    for (label, base, v) in cases {
        let system = system_of(v);
        let (mut o, mut p, mut c) = (vec![], vec![], vec![]);
        let (mut payload, mut confirmed) = (vec![], vec![]);
        for _ in 0..*RUNS {
            prepare(&mut f, base);
            let (s, done, child) = ours(&f, v);
            payload.push(child["bytes_sent"].as_f64().unwrap_or(0.0));
            confirmed.push(done);
            o.push(s);
            prepare(&mut f, base);
            p.push(nix_copy(&f, &ssh, &system, false));
            prepare(&mut f, base);
            c.push(nix_copy(&f, &ssh, &system, true));
        }
        let (o, p, c) = (med(&o), med(&p), med(&c));
        let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}x", a / b) } else { "–".into() };
        rows.push(format!(
            "| {label} | {:.2} s, {} | {:.2} s | {:.2} s, {} | {:.2} s, {} | {} | {} time, {} bytes |",
            o.secs,
            mb(o.wire),
            median(confirmed),
            p.secs,
            mb(p.wire),
            c.secs,
            mb(c.wire),
            mb(median(payload)),
            ratio(o.secs, p.secs),
            ratio(o.wire, p.wire)
        ));
        eprintln!("bench: {}", rows.last().map(String::as_str).unwrap_or(""));
    }
    drop(ssh);
}
