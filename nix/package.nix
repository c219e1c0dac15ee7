# The workspace's binaries, built from Cargo.lock. Only tests that need no network,
# namespaces, root or a Nix store run in the sandbox; the rest run in `make test`.
{ lib, rustPlatform, pkg-config, git, makeWrapper, nix, e2fsprogs, dosfstools, mtools, zstd, util-linux }:
rustPlatform.buildRustPackage {
  pname = "thymis";
  version = "0.1.0";
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../crates
      ../daemon
      ../controller
      ../imager
      ../thymisctl
      ../tests
      ../modules
    ];
  };
  cargoLock.lockFile = ../Cargo.lock;
  nativeBuildInputs = [ pkg-config makeWrapper ];
  nativeCheckInputs = [ git ];
  cargoTestFlags = [ "--workspace" "--exclude" "thymis-fleet-tests" ];
  # These need a Nix store to build into, or root: `make test` runs them.
  checkFlags = [
    "--skip=our_nar_and_hash_match_nix_store_dump"
    "--skip=nix_accepts_our_signatures_and_we_accept_nix_signatures"
    "--skip=closure_imported_by_us_verifies_in_a_chroot_store"
    "--skip=import_refuses_a_nar_of_the_wrong_size"
    "--skip=bundle_roundtrip_imports_into_a_device_store"
    "--skip=tampered_bundles_are_refused"
    "--skip=a_store_names_the_versions_it_has_of_the_paths_it_lacks"
  ];
  # The imager runs nix-store, mkfs.ext4/debugfs, mkfs.vfat, mtools and sfdisk; the
  # controller runs nix and git, and the imager.
  postInstall = ''
    wrapProgram $out/bin/thymis-imager \
      --prefix PATH : ${lib.makeBinPath [ nix e2fsprogs dosfstools mtools util-linux ]}
    wrapProgram $out/bin/thymis-controller \
      --prefix PATH : ${lib.makeBinPath [ nix git e2fsprogs dosfstools mtools zstd util-linux ]}
  '';
  meta = {
    description = "Fleet manager for NixOS devices";
    license = lib.licenses.agpl3Plus;
    mainProgram = "thymisctl";
  };
}
