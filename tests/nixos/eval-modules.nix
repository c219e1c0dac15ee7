# Evaluates this flake's NixOS modules with nixpkgs' real module system
# (`lib.evalModules` of the nixpkgs lib at `nixpkgsLib`), where nixpkgs itself is absent.
# Run by `tests/tests/modules.rs` when NIXPKGS_LIB points at a checkout of nixpkgs' lib.
#
# Stand-ins, because NixOS and nixpkgs' packages are not here: the NixOS options the
# modules set or read are declared with the types and defaults NixOS gives them (and the ACME module's two
# assertions on terms and e-mail), `pkgs` holds fake packages and `formats.toml`, whose
# `generate` refuses nulls as nixpkgs' json2toml does, and `utils.escapeSystemdExecArgs`
# quotes as systemd.service(5) asks: double quotes, "%" as "%%" and "$" as "$$".
# `docExamples` are the module examples of docs/nixos.md, as files.
{ nixpkgsLib, docExamples ? { } }:
let
  lib = import (nixpkgsLib + "/lib");
  inherit (lib) mkOption types;

  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };

  tomlValue = types.nullOr (types.oneOf [
    types.bool types.int types.float types.str types.path
    (types.attrsOf tomlValue) (types.listOf tomlValue)
  ]);
  hasNull = v:
    if v == null then true
    else if builtins.isAttrs v then lib.any hasNull (builtins.attrValues v)
    else if builtins.isList v then lib.any hasNull v
    else false;

  pkgs = {
    thymis = fakePackage "thymis";
    util-linux = fakePackage "util-linux";
    formats.toml = { }: {
      type = tomlValue;
      generate = name: value:
        if hasNull value then throw "json2toml: ${name}: null is not a TOML value"
        else builtins.toFile name (builtins.toJSON value);
    };
    writeTextDir = path: text: builtins.toFile (baseNameOf path) text;
    # nixpkgs' writeShellScript: an executable bash script; here a file holding it.
    writeShellScript = name: text: builtins.toFile name "#!/bin/sh\n${text}";
  };

  utils.escapeSystemdExecArgs = args: lib.concatMapStringsSep " "
    (a: builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON (toString a)))
    args;

  nixos = { config, ... }: {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      nix.package = mkOption { type = types.package; default = fakePackage "nix"; };
      nix.settings = mkOption {
        type = types.submodule { freeformType = types.attrsOf (types.either types.str (types.listOf types.str)); };
        default = { };
      };
      systemd.package = mkOption { type = types.package; default = fakePackage "systemd"; };
      systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
      systemd.services = mkOption {
        default = { };
        type = types.attrsOf (types.submodule {
          options = {
            description = mkOption { type = types.str; default = ""; };
            after = mkOption { type = types.listOf types.str; default = [ ]; };
            before = mkOption { type = types.listOf types.str; default = [ ]; };
            wants = mkOption { type = types.listOf types.str; default = [ ]; };
            wantedBy = mkOption { type = types.listOf types.str; default = [ ]; };
            restartIfChanged = mkOption { type = types.bool; default = true; };
            environment = mkOption { type = types.attrsOf types.str; default = { }; };
            path = mkOption { type = types.listOf (types.either types.package types.str); default = [ ]; };
            serviceConfig = mkOption {
              type = types.attrsOf (types.oneOf [ types.bool types.int types.str (types.listOf types.str) ]);
              default = { };
            };
          };
        });
      };
      services.dbus.packages = mkOption { type = types.listOf types.path; default = [ ]; };
      # nixos/modules/config/locale.nix: links /etc/localtime into the zone database.
      time.timeZone = mkOption { type = types.nullOr types.str; default = null; };
      # nixos/modules/system/etc/etc.nix: each file from text or from a source.
      environment.etc = mkOption {
        default = { };
        type = types.attrsOf (types.submodule {
          options = {
            text = mkOption { type = types.nullOr types.lines; default = null; };
            source = mkOption { type = types.nullOr types.path; default = null; };
          };
        });
      };
      boot.kernelParams = mkOption { type = types.listOf types.str; default = [ ]; };
      systemd.watchdog.runtimeTime = mkOption { type = types.nullOr types.str; default = null; };
      boot.loader.efi.canTouchEfiVariables = mkOption { type = types.bool; default = false; };
      boot.loader.systemd-boot.enable = mkOption { type = types.bool; default = false; };
      boot.loader.systemd-boot.configurationLimit = mkOption { type = types.nullOr types.int; default = null; };
      boot.loader.grub.enable = mkOption { type = types.bool; default = true; };
      boot.loader.grub.configurationLimit = mkOption { type = types.int; default = 100; };
      boot.loader.generic-extlinux-compatible.enable = mkOption { type = types.bool; default = false; };
      boot.loader.generic-extlinux-compatible.configurationLimit = mkOption { type = types.int; default = 20; };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      security.acme.acceptTerms = mkOption { type = types.bool; default = false; };
      security.acme.defaults.email = mkOption { type = types.nullOr types.str; default = null; };
      services.nginx = {
        enable = mkOption { type = types.bool; default = false; };
        recommendedProxySettings = mkOption { type = types.bool; default = false; };
        virtualHosts = mkOption {
          default = { };
          type = types.attrsOf (types.submodule {
            options = {
              forceSSL = mkOption { type = types.bool; default = false; };
              enableACME = mkOption { type = types.bool; default = false; };
              locations = mkOption {
                default = { };
                type = types.attrsOf (types.submodule {
                  options = {
                    proxyPass = mkOption { type = types.nullOr types.str; default = null; };
                    proxyWebsockets = mkOption { type = types.bool; default = false; };
                  };
                });
              };
            };
          });
        };
      };
    };
    config.assertions =
      let acme = lib.any (v: v.enableACME) (builtins.attrValues config.services.nginx.virtualHosts);
      in lib.optionals acme [
        { assertion = config.security.acme.acceptTerms; message = "You must accept the CA's terms of service (security.acme.acceptTerms)."; }
        { assertion = config.security.acme.defaults.email != null; message = "ACME needs an e-mail address (security.acme.defaults.email)."; }
      ];
  };

  # The flake's outputs as `nix flake check` sees them, without nixpkgs: its modules.
  flake = (import ../../flake.nix).outputs {
    self = flake // { packages.x86_64-linux.default = fakePackage "thymis-flake"; };
    nixpkgs.lib = lib;
  };

  eval = modules: (lib.evalModules {
    modules = [ nixos ] ++ modules;
    specialArgs = { inherit utils; pkgs = pkgs // { stdenv.hostPlatform.system = "x86_64-linux"; }; };
  }).config;
  # What a NixOS system would refuse to build with: the failed assertions' messages.
  failed = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  # The file after --config in the agent's ExecStart (each argument a JSON string).
  agentToml = config: builtins.fromJSON (builtins.readFile (builtins.fromJSON (builtins.unsafeDiscardStringContext
    (lib.last (lib.splitString " " config.systemd.services.thymis-agent.serviceConfig.ExecStart)))));

  agent = extra: eval [ ../../modules/agent.nix { services.thymis-agent = lib.recursiveUpdate { enable = true; settings.controller_url = "wss://c.example/agent/v1"; } extra; } ];
  controller = extra: eval [ ../../modules/controller.nix { services.thymis-controller = { enable = true; } // extra; } ];
in
{
  # The generated agent.toml without an enrollment token file (a null left out).
  agentTomlWithoutToken = agentToml (agent { });
  agentTomlWithTerminal = agentToml (agent { settings.terminal = true; settings.substituters = [ "http://cache.site.example" ]; });
  # Hangs reset by themselves unless turned off; the loader's limit and EFI rights reach the agent.
  agentHangProtection = let c = agent { }; in {
    kernelParams = c.boot.kernelParams;
    watchdog = c.systemd.watchdog.runtimeTime;
    toml = agentToml c;
  };
  agentHangProtectionOff = let c = agent { hangProtection.enable = false; }; in {
    kernelParams = c.boot.kernelParams;
    watchdog = c.systemd.watchdog.runtimeTime;
  };
  agentSystemdBoot = agentToml (eval [ ../../modules/agent.nix {
    services.thymis-agent = { enable = true; settings.controller_url = "wss://c.example/agent/v1"; };
    boot.loader = { grub.enable = false; systemd-boot = { enable = true; configurationLimit = 5; }; efi.canTouchEfiVariables = true; };
  } ]);
  # Health checks become files of the system's /etc: a required one, a wanted one,
  # their timeouts and the generation's deadline.
  agentHealthChecks = let c = agent {
    healthChecks = { page.script = "curl -fsS http://localhost/"; sensor = { script = "exit 0"; required = false; timeout = 5; }; };
    healthCheckDeadline = 30;
  }; in lib.mapAttrs (n: f: if f.text != null then f.text else builtins.readFile f.source) c.environment.etc;
  agentNoHealthChecks = (agent { }).environment.etc;
  # A hold group: in the agent's TOML, and a bus policy that lets it call Hold/Release.
  agentHoldGroup = let c = agent { settings.hold_group = "kiosk"; }; in {
    toml = agentToml c;
    policies = map builtins.readFile c.services.dbus.packages;
  };
  agentNoHoldGroupPolicies = builtins.length (agent { }).services.dbus.packages;
  # A secret's path follows secrets_dir.
  agentSecretPath = (agent { secrets.wifi-psk = { }; }).services.thymis-agent.secrets.wifi-psk.path;
  # The units that read a secret start after the agent has put it back (at boot).
  agentSecretUsers = (agent {
    secrets.api = { usedBy = [ "kiosk.service" ]; };
    secrets.wifi = { usedBy = [ "kiosk.service" "wpa_supplicant.service" ]; };
  }).systemd.services.thymis-agent.before;
  agentNoSecretUsers = (agent { secrets.wifi = { }; }).systemd.services.thymis-agent.before;
  agentSecretPathElsewhere = (agent { settings.secrets_dir = "/run/keys"; secrets.token = { }; }).services.thymis-agent.secrets.token.path;
  # The default package is pkgs.thymis (the overlay's).
  agentExecStart = (agent { }).systemd.services.thymis-agent.serviceConfig.ExecStart;
  agentStateDirectory = (agent { settings.state_dir = "/var/lib/fleet"; }).systemd.services.thymis-agent.serviceConfig.StateDirectory;
  agentElsewhere = let c = agent { settings.state_dir = "/data/thymis"; }; in {
    hasStateDirectory = c.systemd.services.thymis-agent.serviceConfig ? StateDirectory;
    tmpfiles = c.systemd.tmpfiles.rules;
  };

  # nixosModules.default and nixosModules.agent imported together.
  bothFlakeModules = let c = eval [ flake.nixosModules.default flake.nixosModules.agent { services.thymis-agent.enable = true; services.thymis-agent.settings.controller_url = "ws://c/agent/v1"; } ];
    in c.systemd.services.thymis-agent.serviceConfig.ExecStart;

  controllerPlain = (controller { settings = { insecure-plain-http = true; parallel = 20; }; }).systemd.services.thymis-controller.serviceConfig.ExecStart;
  controllerPostgres = let c = controller { database = "postgres://thymis@db.example/thymis?sslmode=verify-full&sslrootcert=/etc/db-ca.pem"; environmentFile = "/run/secrets/thymis.env"; }; in {
    execStart = c.systemd.services.thymis-controller.serviceConfig.ExecStart;
    environment = c.systemd.services.thymis-controller.environment;
    environmentFile = c.systemd.services.thymis-controller.serviceConfig.EnvironmentFile;
  };
  controllerPostgresPlain = failed (controller { database = "postgres://thymis@db.example/thymis"; });
  controllerPostgresTls = failed (controller { database = "postgres://thymis@db.example/thymis?sslmode=verify-full&sslrootcert=/etc/db-ca.pem"; });
  controllerPostgresLocal = failed (controller { database = "postgres://thymis@%2Frun%2Fpostgresql/thymis"; });
  controllerDefault = (controller { settings.insecure-plain-http = false; }).systemd.services.thymis-controller.serviceConfig.ExecStart;
  # systemd would expand these: they must reach the controller as written.
  controllerEscaped = (controller { publicUrl = "wss://x.example/%h/$HOME"; }).systemd.services.thymis-controller.serviceConfig.ExecStart;
  controllerFirewallOnLoopback = failed (controller { openFirewall = true; });
  controllerFirewallOnAll = let c = controller { openFirewall = true; listen = "0.0.0.0:8443"; }; in {
    failed = failed c;
    ports = c.networking.firewall.allowedTCPPorts;
  };
  nginx = let c = controller { nginx = { enable = true; hostName = "t.example"; }; }; in {
    proxyPass = c.services.nginx.virtualHosts."t.example".locations."/".proxyPass;
    execStart = c.systemd.services.thymis-controller.serviceConfig.ExecStart;
  };
  nginxPlain = (controller { settings.insecure-plain-http = true; nginx = { enable = true; hostName = "t.example"; }; })
    .services.nginx.virtualHosts."t.example".locations."/".proxyPass;

  docExamples = lib.mapAttrs (name: file:
    let c = eval [ flake.nixosModules.default file ];
    in {
      failed = failed c;
      units = builtins.attrNames c.systemd.services;
      agentToml = if c.systemd.services ? thymis-agent && c.services.thymis-agent.configFile == null then agentToml c else null;
      agentBefore = if c.systemd.services ? thymis-agent then c.systemd.services.thymis-agent.before else [ ];
    }) docExamples;
}
