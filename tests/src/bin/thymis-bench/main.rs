//! `make bench`: transfer against `nix copy --to ssh-ng://` (plain and compressed) to
//! the same device behind a 100 Mbit/s link, fleet fan-out, and the agent's footprint.
//! Every figure is a median of three runs, measured side by side with its baseline in
//! the same run; the table goes to stdout and `docs/benchmarks.md`. One file per part.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use thymis_fleet_tests::{Fleet, FleetOptions};
use thymis_store::signing::PublicKey;

mod bump;
mod common;
mod fan_out;
mod footprint;
mod imager;
mod load;
mod real_size;
mod site_cache;
mod transfer;

use bump::*;
use common::*;
use fan_out::*;
use footprint::*;
use imager::*;
use load::*;
use real_size::*;
use site_cache::*;
use transfer::*;

fn main() {
    let machine = format!(
        "{} cores, {} memory, {}, Nix {}",
        sh(&mut Command::new("nproc")),
        sh(Command::new("sh").args(["-c", "free -h | awk '/Mem:/ {print $2}'"])),
        sh(Command::new("uname").args(["-sr"])),
        sh(Command::new("nix-store").arg("--version")).replace("nix-store (Nix) ", "")
    );
    let agents: usize = std::env::var("THYMIS_BENCH_AGENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    // THYMIS_BENCH_ONLY=scale|transfer|real|bump|load|fanout|cache|loadcache|imager runs (and prints) only that part, for investigating.
    match std::env::var("THYMIS_BENCH_ONLY").as_deref() {
        Ok("scale") => {
            println!("{}", scale(agents).join("\n"));
            return;
        }
        Ok(part @ ("real" | "bump" | "load" | "transfer" | "cache" | "loadcache" | "imager")) => {
            let mut rows = vec![];
            match part {
                "real" => real_size(&mut rows),
                "bump" => bump(&mut rows),
                "cache" => site_cache(&mut rows),
                "loadcache" => site_cache_load(&mut rows),
                "load" => fan_out_load(&mut rows),
                "transfer" => transfer(&mut rows),
                _ => imager(&mut rows),
            }
            println!("{}", rows.join("\n"));
            return;
        }
        Ok("fanout") => {
            let mut rows = vec![];
            let foot = fan_out(&mut rows);
            println!("{}\n{foot}", rows.join("\n"));
            return;
        }
        _ => {}
    }
    let mut transfer_rows = vec![];
    transfer(&mut transfer_rows);
    let mut real_rows = vec![];
    real_size(&mut real_rows);
    let mut bump_rows = vec![];
    bump(&mut bump_rows);
    let mut fan_rows = vec![];
    let foot = fan_out(&mut fan_rows);
    let mut load_rows = vec![];
    fan_out_load(&mut load_rows);
    let mut cache_rows = vec![];
    site_cache(&mut cache_rows);
    let mut load_cache_rows = vec![];
    site_cache_load(&mut load_cache_rows);
    let mut imager_rows = vec![];
    imager(&mut imager_rows);
    let scale_rows = scale(agents);
    let doc = format!(
        "# Benchmarks\n\nMeasured by `make bench` on {machine}. Medians of {} runs; each baseline ran side by side in the same run.\n\n\
## Transfer: a 223 MB closure of 8 paths to a device behind a {RATE} link\n\n\
Ours: `thymisctl deploy` of a configuration built beforehand (`thymisctl build`; the baselines too copy a closure that is already built), from start to the device's report that it activated (offer, query, copy of the missing paths, activation), and to the confirmed result (confirmation over a new connection). \
Baselines: `nix copy --to ssh-ng://` to the same device (sshd in its namespaces), plain and with `?compress=true`. \
Bytes are what crossed the device's veth (both directions).\n\n\
| case | ours, to activation | ours, to confirmation | ssh-ng | ssh-ng compress=true | our compressed payload | ours / plain ssh-ng |\n|---|---|---|---|---|---|---|\n{}\n\n\
## A real-sized system: a closure shaped like NixOS's to an empty device\n\n\
Ours: as above, to the device's activation report. The floor: `nix-store --export` of the closure piped into `nix-store --import` of an empty store on this machine. The link rate is a bulk TCP stream's through the same shaped link.\n\n\
| | |\n|---|---|\n{}\n\n\
## A nixpkgs bump: the real-sized system rebuilt, to a device that runs the previous one\n\n\
`bench/nixos-like.nix` with `bump = 1`: every path rebuilt with a new hash, its contents differing only in the store paths they name, a tenth of the packages with a new version in their name, a few with new content. Ours: as above, built beforehand (the controller made the deltas after the build, timed on their own below). Baselines side by side: `nix copy --to ssh-ng://` of the same update to the same device on the previous system, and the floor of one zstd patch of the whole new closure against the whole old one.\n\n\
| | |\n|---|---|\n{}\n\n\
## Fan-out: one configuration (13 paths, 5 MB) to N devices at once\n\n\
| devices | time | vs. one device | builds | compressions |\n|---|---|---|---|---|\n{}\n\n\
## Fan-out where the controller is the bottleneck: load-generator agents\n\n\
N agents speaking the real protocol from one process (each with its own key, enrollment and connection) take one deployment at once; each checks every NAR (zstd, sha256, size against the signed path info) but imports nothing, so the figures are the controller's: its time to serve every copy, the aggregate compressed bytes per second it sent, its peak resident memory, its CPU time per device, and what it read from the disk (the cache's NARs are read once per path, not once per device, when the page cache holds them). The closure: 527 paths, 500 of them small and 24 of 2 MiB of incompressible data. The load generators share the machine's cores with the controller; their CPU use is in the last column.\n\n\
| devices | all copies done | per device | aggregate | controller peak memory (connected, before the deployment) | controller CPU | controller disk reads | load generators' CPU |\n|---|---|---|---|---|---|---|---|\n{}\n\n\
## A fleet-wide rollout through a site cache\n\n\
The same deployment (a closure of 315 paths, 5 MB of it incompressible) to 20 devices, through the controller alone, and with the devices substituting from the site cache the controller publishes to (`--publish-cache file://...?compression=zstd`, served by busybox httpd on the same machine); first with no link limit (devices, cache and controller share this machine's cores), then with what the controller sends to all devices together capped at 20 Mbit/s, as a site's uplink to a distant controller would be (the cache, on the site, is not capped): time from `thymisctl deploy` to every device confirmed, and the compressed bytes the controller sent against those the devices took from the cache (docs/scale.md).\n\n\
| | devices | all confirmed | controller sent | from the cache |\n|---|---|---|---|---|\n{}\n\n\
The same comparison with load-generator agents (each fetches every narinfo and NAR its cache has over HTTP, checks the signature, hash and size, imports nothing, and asks the controller for the rest): time from `thymisctl deploy` to every copy done, what the controller counted as sent and as substituted, and the controller's CPU time for the rollout.\n\n\
| | devices | all copies done | controller sent | from the cache | controller CPU |\n|---|---|---|---|---|---|\n{}\n\n\
## Agent footprint\n\n| | |\n|---|---|\n{foot}\n\n\
## Imager: the transfer benchmark's closure\n\n| | ours | baseline | ours / baseline |\n|---|---|---|---|\n{}\n\n\
## Controller scale: {agents} idle agents speaking the real protocol from one process\n\n| | |\n|---|---|\n{}\n",
        *RUNS,
        transfer_rows.join("\n"),
        real_rows.join("\n"),
        bump_rows.join("\n"),
        fan_rows.join("\n"),
        load_rows.join("\n"),
        cache_rows.join("\n"),
        load_cache_rows.join("\n"),
        imager_rows.join("\n"),
        scale_rows.join("\n"),
    );
    println!("{doc}");
    std::fs::write(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md"), doc)
        .expect("write docs/benchmarks.md");
}
