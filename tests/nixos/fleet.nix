# NixOS VM test (nix flake check): a controller and two devices running this flake's
# modules. Written for real NixOS (runNixOSTest); the development machines have no
# nixpkgs, so it has not run there: see docs/nixos.md.
#
# The controller's project is a flake of real NixOS configurations for the devices
# (their own VM configuration plus a variant), evaluated against this flake's nixpkgs
# (--override-input, no network); their outputs are prebuilt into the store through
# system.extraDependencies, so the controller only has to evaluate them.
{ self }:
{ pkgs, lib, ... }:
let
  system = pkgs.stdenv.hostPlatform.system;
  # The device configuration, shared by the VM nodes and the project: a file of this
  # repository, imported directly (no import-from-derivation) and copied into the project.
  deviceModule = ./device.nix;
  variants = {
    good = { environment.etc."thymis-marker".text = "good"; };
    broken = { system.activationScripts.thymisFail = "echo failing on purpose; exit 1"; };
    blocking = { networking.firewall.extraCommands = "iptables -I OUTPUT -p tcp --dport 8443 -j DROP"; };
  };
  build = extra: (pkgs.nixos [ self.nixosModules.agent deviceModule extra ]).config.system.build.toplevel;
  # The devices' configuration "fleet" takes the variant named in ./variant (good,
  # broken or blocking), so a test changes what the devices run by editing one file.
  projectFlake = pkgs.writeText "flake.nix" ''
    {
      inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
      inputs.thymis.url = "github:thymis-io/thymis-rs";
      outputs = { self, nixpkgs, thymis }:
        let
          variants = {
            good = { environment.etc."thymis-marker".text = "good"; };
            broken = { system.activationScripts.thymisFail = "echo failing on purpose; exit 1"; };
            blocking = { networking.firewall.extraCommands = "iptables -I OUTPUT -p tcp --dport 8443 -j DROP"; };
          };
          variant = builtins.replaceStrings [ "\\n" ] [ "" ] (builtins.readFile ./variant);
        in {
          nixosConfigurations.fleet = nixpkgs.lib.nixosSystem {
            system = "${system}";
            modules = [ thymis.nixosModules.agent ./device.nix variants.''${variant} ];
          };
        };
    }
  '';
in
{
  name = "thymis-fleet";

  nodes = {
    controller = { ... }: {
      imports = [ (import ./controller-node.nix { inherit self; }) ];
      services.thymis-controller = {
        settings.confirm-timeout = 30;
        overrideInputs = {
          nixpkgs = "path:${pkgs.path}";
          thymis = "path:${self.outPath}";
        };
      };
      environment.systemPackages = [ self.packages.${system}.default pkgs.git ];
      system.extraDependencies = [ pkgs.path self.outPath ] ++ map build (lib.attrValues variants);
      virtualisation.memorySize = 3072;
      virtualisation.diskSize = 4096;
    };
    dev1 = { imports = [ self.nixosModules.agent deviceModule ]; };
    dev2 = { imports = [ self.nixosModules.agent deviceModule ]; };
  };

  testScript = ''
    import json

    start_all()
    controller.wait_for_unit("thymis-controller.service")
    controller.wait_for_open_port(8443)
    env = "THYMIS_CONTROLLER=https://127.0.0.1:8443 THYMIS_TOKEN_FILE=/var/lib/thymis/admin-token"
    ctl = lambda args: controller.succeed(f"{env} thymisctl {args}")

    # The project: real configurations for the devices, tagged.
    controller.succeed(
        "cp ${projectFlake} /var/lib/thymis/project/flake.nix && "
        "cp ${deviceModule} /var/lib/thymis/project/device.nix && "
        "echo good > /var/lib/thymis/project/variant && "
        "printf '[configs.fleet]\\ntags = [\"fleet\"]\\n' > /var/lib/thymis/project/thymis.toml"
    )

    for dev in [dev1, dev2]:
        out = json.loads(ctl(f"--json device add {dev.name} --config fleet"))
        dev.succeed("mkdir -p /etc/thymis && cat > /etc/thymis/agent.toml <<'EOF'\n" + out["agent_config"] + "EOF")
        dev.succeed("systemctl restart thymis-agent")
        dev.wait_for_unit("thymis-agent.service")
    controller.wait_until_succeeds(f"{env} thymisctl --json devices | grep -c '\"online\": true' | grep -qx 2")

    # Deploy to the tag: both devices run the new commit.
    task = json.loads(ctl("--json deploy --tag fleet -m 'first deployment' --wait"))
    assert task["result"] == "succeeded", task
    for dev in [dev1, dev2]:
        dev.succeed("test \"$(cat /etc/thymis-marker)\" = good")
        dev.succeed("busctl get-property io.thymis.Agent1 /io/thymis/Agent1 io.thymis.Agent1 State | grep -q idle")
    devices = json.loads(ctl("--json devices"))
    assert all(d["commit"] == task["commit"] for d in devices), devices
    good = {d["name"]: d["system"] for d in devices}

    # A configuration whose activation fails rolls back; the devices keep running "good".
    controller.succeed("echo broken > /var/lib/thymis/project/variant")
    task = json.loads(controller.fail(f"{env} thymisctl --json deploy --tag fleet -m broken --wait"))
    for child in task["children"]:
        assert child["result"] == "rolled-back" and child["reason"] == "activation-failed", child
    for dev in [dev1, dev2]:
        dev.succeed("test \"$(cat /etc/thymis-marker)\" = good")
        assert dev.succeed("readlink -f /run/current-system").strip() == good[dev.name]

    # A configuration that blocks the controller's port rolls back unconfirmed.
    controller.succeed("echo blocking > /var/lib/thymis/project/variant")
    task = json.loads(controller.fail(f"{env} thymisctl --json deploy --tag fleet -m blocking --wait"))
    for child in task["children"]:
        assert child["result"] == "rolled-back" and child["reason"] == "unconfirmed", child
    for dev in [dev1, dev2]:
        assert dev.succeed("readlink -f /run/current-system").strip() == good[dev.name]
  '';
}
