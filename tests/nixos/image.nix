# NixOS VM test (nix flake check): a device installed from an image that thymis-imager
# made inside a Nix build (from a closureInfo, no store daemon), booted through the
# image's own systemd-boot under OVMF, enrolls with the controller and reports the
# image's system. Written for real NixOS (runNixOSTest); the development machines have
# no nixpkgs, so it has not run there: see docs/nixos.md. (What can run there does:
# tests/tests/images.rs boots an imager-built image in QEMU and enrolls it.)
{ self }:
{ pkgs, lib, nodes, ... }:
let
  system = pkgs.stdenv.hostPlatform.system;
  thymis = self.packages.${system}.default;
  # The device's system is this test node's own (it carries the test driver's
  # instrumentation), booted from the image instead of the host's store.
  toplevel = nodes.imaged.system.build.toplevel;
  image = pkgs.runCommand "thymis-test-image"
    {
      nativeBuildInputs = [ thymis pkgs.nix pkgs.e2fsprogs pkgs.dosfstools pkgs.mtools pkgs.util-linux ];
      closureInfo = pkgs.closureInfo { rootPaths = [ toplevel ]; };
    }
    ''
      export HOME=$TMPDIR
      # A placeholder the test replaces with the enrollment it gets from the controller.
      echo '# replaced by the test' > placeholder.toml
      thymis-imager build --system ${toplevel} --closure-info $closureInfo \
        --agent-config placeholder.toml --name device --out $out
    '';
in
{
  name = "thymis-image";

  nodes = {
    controller = { ... }: {
      imports = [ (import ./controller-node.nix { inherit self; }) ];
      environment.systemPackages = [ thymis ];
    };
    imaged = { lib, ... }: {
      imports = [ self.nixosModules.agent ];
      services.thymis-agent = { enable = true; configFile = "/etc/thymis/agent.toml"; };
      boot.loader.systemd-boot.enable = true;
      boot.loader.efi.canTouchEfiVariables = false;
      # Boot the disk's own boot loader and file systems, as a flashed device does.
      virtualisation = {
        directBoot.enable = false;
        mountHostNixStore = false;
        useEFIBoot = true;
        fileSystems = lib.mkForce {
          "/" = { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; };
          "/boot" = { device = "/dev/disk/by-label/ESP"; fsType = "vfat"; };
        };
      };
    };
  };

  testScript = ''
    import json, os, subprocess, tempfile

    controller.start()
    controller.wait_for_unit("thymis-controller.service")
    controller.wait_for_open_port(8443)
    env = "THYMIS_CONTROLLER=https://127.0.0.1:8443 THYMIS_TOKEN_FILE=/var/lib/thymis/admin-token"
    enrollment = json.loads(controller.succeed(f"{env} thymisctl --json device add imaged --config kiosk"))

    # Flash the image to a disk file, then put the enrollment in, as the controller's
    # "download image" does for a device.
    work = tempfile.mkdtemp()
    raw = os.path.join(work, "disk.raw")
    subprocess.run(["${pkgs.zstd}/bin/zstd", "-d", "-q", "${image}/device.img.zst", "-o", raw], check=True)
    agent_toml = os.path.join(work, "agent.toml")
    with open(agent_toml, "w") as f:
        f.write(enrollment["agent_config"])
    os.chmod(agent_toml, 0o600)
    manifest = json.load(open("${image}/manifest.json"))
    assert manifest["boots"], manifest
    root = f"{raw}?offset={65 * 1024 * 1024}"
    subprocess.run(["${pkgs.e2fsprogs}/bin/debugfs", "-w", "-R", "rm /etc/thymis/agent.toml", root], check=True)
    subprocess.run(["${pkgs.e2fsprogs}/bin/debugfs", "-w", "-R", f"write {agent_toml} /etc/thymis/agent.toml", root], check=True)
    overlay = os.path.join(work, "disk.qcow2")
    subprocess.run(["${pkgs.qemu}/bin/qemu-img", "create", "-f", "qcow2", "-b", raw, "-F", "raw", overlay], check=True)
    os.environ["NIX_DISK_IMAGE"] = overlay

    imaged.start()
    imaged.wait_for_unit("thymis-agent.service")
    assert imaged.succeed("readlink -f /run/current-system").strip() == "${toplevel}"
    imaged.succeed("test -d /boot/loader/entries && ls /boot/loader/entries | grep -q nixos-generation-1.conf")
    def imaged_row():
        rows = json.loads(controller.succeed(f"{env} thymisctl --json devices"))
        return next(d for d in rows if d["name"] == "imaged")

    # Online first, then its first report names what it runs.
    retry(lambda _: imaged_row()["online"] and imaged_row()["system"] is not None)
    device = imaged_row()
    assert device["enrolled"], device
    assert device["system"] == "${toplevel}", device
  '';
}
