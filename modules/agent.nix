# services.thymis-agent: the Thymis device agent as a systemd service.
#
# The unit's settings come from ./agent-unit.json, the same file the plain unit
# daemon/systemd/thymis-agent.service is generated from (a test fails when they drift).
# restartIfChanged = false: activation must not kill the agent mid-deployment; after a
# confirmed deployment that changed the agent, the agent restarts itself.
{ config, lib, pkgs, utils, ... }:
let
  cfg = config.services.thymis-agent;
  unit = builtins.fromJSON (builtins.readFile ./agent-unit.json);
  toml = pkgs.formats.toml { };
  # Unset options (null) are left out: TOML has no null.
  generated = toml.generate "thymis-agent.toml" (lib.filterAttrsRecursive (_: v: v != null) cfg.settings);
  stateDir = cfg.settings.state_dir;
  # systemd makes and owns a state directory under /var/lib; elsewhere, tmpfiles does.
  underVarLib = lib.hasPrefix "/var/lib/" stateDir;
  configPath = if cfg.configFile != null then cfg.configFile else generated;
  # The boot loader's own generation limit, which the agent's pruning follows.
  loader = config.boot.loader;
  loaderLimit =
    if loader.systemd-boot.enable then loader.systemd-boot.configurationLimit
    else if loader.grub.enable then loader.grub.configurationLimit
    else if loader.generic-extlinux-compatible.enable then loader.generic-extlinux-compatible.configurationLimit
    else null;
  dbusPolicy = pkgs.writeTextDir "share/dbus-1/system.d/io.thymis.Agent1.conf"
    (builtins.readFile ../daemon/dbus/io.thymis.Agent1.conf);
  # The hold group may call Hold and Release (the agent checks the caller's groups too).
  holdGroup = cfg.settings.hold_group;
  holdPolicy = pkgs.writeTextDir "share/dbus-1/system.d/io.thymis.Agent1-hold.conf"
    (builtins.replaceStrings [ "@holdGroup@" ] [ (toString holdGroup) ]
      (builtins.readFile ../daemon/dbus/io.thymis.Agent1-hold.conf.in));
in
{
  options.services.thymis-agent = {
    enable = lib.mkEnableOption "the Thymis device agent";

    package = lib.mkPackageOption pkgs "thymis" {
      extraDescription = "It provides bin/thymis-agent (the flake's module and its overlay set it).";
    };

    settings = lib.mkOption {
      description = ''
        The agent's configuration, rendered to TOML (see docs/agent.md). Secrets go by
        file path (enrollment_token_file): whatever is written here is world-readable
        in the Nix store.
      '';
      default = { };
      type = lib.types.submodule {
        freeformType = toml.type;
        options = {
          controller_url = lib.mkOption {
            type = lib.types.str;
            example = "wss://controller.example:8443/agent/v1";
          };
          state_dir = lib.mkOption {
            type = lib.types.str;
            default = "/var/lib/thymis-agent";
          };
          enrollment_token_file = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = null;
            description = "A file holding the enrollment token (read at runtime, never copied to the store).";
          };
          controller_identity_keys = lib.mkOption {
            type = lib.types.listOf lib.types.str;
            default = [ ];
          };
          nix_trusted_keys = lib.mkOption {
            type = lib.types.listOf lib.types.str;
            default = [ ];
          };
          confirm_timeout = lib.mkOption {
            type = lib.types.ints.positive;
            default = 120;
          };
          substituters = lib.mkOption {
            type = lib.types.listOf lib.types.str;
            default = [ ];
            example = [ "http://cache.site.example" ];
            description = ''
              Nix binary caches the agent takes a deployment's paths from before the
              controller sends them (for example the cache the controller publishes to
              with --publish-cache, served by the site's web server). What they serve must
              be signed by a key of nix_trusted_keys; a cache that fails only sends the
              device back to the controller.
            '';
          };
          secrets_dir = lib.mkOption {
            type = lib.types.str;
            default = "/run/thymis/secrets";
            description = ''
              Where the agent writes the device's secrets (`thymisctl secret set`), one file
              per secret with its owner, group and mode, before each deployment activates.
              A tmpfs by default: they never rest on a disk in clear.
            '';
          };
          hold_group = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = null;
            example = "kiosk";
            description = ''
              A group whose members (besides root) may hold updates over D-Bus
              (`io.thymis.Agent1.Hold(reason)` / `Release()`): while held, deployments
              are copied and staged, and the device switches once released. The hold
              file (hold_file, default /run/thymis/hold) is the other way; a hold older
              than hold_max_age seconds (default a day) is reported and no longer obeyed.
            '';
          };
          terminal = lib.mkOption {
            type = lib.types.bool;
            default = false;
            description = ''
              Let the controller's admin open a terminal on this device (`thymisctl shell`,
              the device page): a root shell. Off unless you want whoever holds the
              controller's admin token to have root here.
            '';
          };
        };
      };
    };

    hangProtection = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          Make a generation that hangs at boot reset by itself, so that an unconfirmed
          generation tried once comes back to the confirmed one without anyone at the
          device: `panic=<panicTimeout>` and `boot.panic_on_fail` on the kernel command
          line (a stage 1 failure panics, a panic resets), and systemd's hardware
          watchdog (`systemd.watchdog.runtimeTime`, where the board has one). The agent
          refuses reboot deployments into a system that has neither (unless
          allow_unsafe_reboot). Turning this off means a device that hangs on a new
          generation stays hung until someone power-cycles it.
        '';
      };
      panicTimeout = lib.mkOption {
        type = lib.types.ints.positive;
        default = 10;
        description = "Seconds from a kernel panic to the reset (`panic=`).";
      };
      watchdog = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = "30s";
        description = ''
          systemd's hardware watchdog period (`systemd.watchdog.runtimeTime`); a stage 2
          that stops serving it resets the device. null leaves the watchdog alone.
        '';
      };
    };

    healthChecks = lib.mkOption {
      description = ''
        Checks that the device is healthy on a new generation: after a deployment's
        activation (and after the boot of a reboot deployment) the agent runs each
        until it exits 0 or healthCheckDeadline passes, before it reports the device
        ready for confirmation. A required check still failing rolls the device back
        (reason health-check-failed, with the check's output); a wanted one is named in
        the result (succeeded-with-failed-checks). They ship with the system
        (/etc/thymis/health-checks), so each generation is judged by its own checks.
        Each runs with a clean environment (PATH: the new system's tools) as root.
      '';
      default = { };
      example = lib.literalExpression ''
        {
          kiosk-page.script = "curl -fsS http://localhost/ | grep -q '<body'";
          sensor = { script = "systemctl is-active --quiet sensor"; required = false; };
        }
      '';
      type = lib.types.attrsOf (lib.types.submodule {
        options = {
          script = lib.mkOption {
            type = lib.types.lines;
            description = "Shell commands; exit 0 when healthy.";
          };
          required = lib.mkOption {
            type = lib.types.bool;
            default = true;
            description = "Whether the check failing rolls the deployment back (else it is only named).";
          };
          timeout = lib.mkOption {
            type = lib.types.ints.positive;
            default = 60;
            description = "Seconds one run of the check may take before it is killed (and counts as failed).";
          };
        };
      });
    };

    secrets = lib.mkOption {
      description = ''
        The secrets this device's services use, by name: each one's `path` is where the
        agent writes it (set their values with `thymisctl secret set NAME`; they never
        enter the Nix store). Use the path as a service's `EnvironmentFile=` or a
        `LoadCredential=` source.
      '';
      default = { };
      example = lib.literalExpression ''
        { wifi-psk = { }; }   # then: config.services.thymis-agent.secrets.wifi-psk.path
      '';
      type = lib.types.attrsOf (lib.types.submodule ({ name, ... }: {
        options.path = lib.mkOption {
          type = lib.types.str;
          readOnly = true;
          default = "${cfg.settings.secrets_dir}/${name}";
          description = "Where the agent writes this secret on the device.";
        };
        options.usedBy = lib.mkOption {
          type = lib.types.listOf lib.types.str;
          default = [ ];
          example = [ "kiosk.service" ];
          description = ''
            The units that read this secret. At boot they start after the agent is ready,
            which it is once it has put the secrets back in place (`secrets_dir` is a
            tmpfs, empty after a boot).
          '';
        };
      }));
    };

    healthCheckDeadline = lib.mkOption {
      type = lib.types.ints.positive;
      default = 120;
      description = "Seconds a generation's health checks may keep failing (retried every few seconds) before it counts as unhealthy.";
    };

    configFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/etc/thymis/agent.toml";
      description = ''
        A configuration file read at runtime instead of `settings`, e.g. the
        agent_config that `thymisctl device add NAME --json` prints (it holds a secret).
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [{
      assertion = cfg.configFile != null || !(cfg.settings ? enrollment_token);
      message = "services.thymis-agent.settings.enrollment_token would put a secret in the Nix store; use enrollment_token_file.";
    }];

    services.dbus.packages = [ dbusPolicy ] ++ lib.optional (holdGroup != null) holdPolicy;

    # What the agent reads about the boot loader (docs/agent.md, "Boot loaders").
    services.thymis-agent.settings = {
      can_touch_efi_variables = lib.mkDefault config.boot.loader.efi.canTouchEfiVariables;
    } // lib.optionalAttrs (loaderLimit != null) {
      configuration_limit = lib.mkDefault loaderLimit;
    };

    boot.kernelParams = lib.mkIf cfg.hangProtection.enable
      [ "panic=${toString cfg.hangProtection.panicTimeout}" "boot.panic_on_fail" ];
    systemd.watchdog.runtimeTime = lib.mkIf (cfg.hangProtection.enable && cfg.hangProtection.watchdog != null)
      (lib.mkDefault cfg.hangProtection.watchdog);

    systemd.services.thymis-agent = {
      inherit (unit) description after wants wantedBy restartIfChanged;
      before = lib.unique (lib.concatMap (s: s.usedBy) (lib.attrValues cfg.secrets));
      path = [ config.nix.package config.systemd.package pkgs.util-linux ];
      serviceConfig = removeAttrs unit.serviceConfig [ "StateDirectory" ] // {
        ExecStart = utils.escapeSystemdExecArgs [ "${cfg.package}/bin/thymis-agent" "--config" configPath ];
      } // lib.optionalAttrs underVarLib {
        StateDirectory = lib.removePrefix "/var/lib/" stateDir;
      };
    };

    systemd.tmpfiles.rules = lib.optionals (!underVarLib) [ "d ${stateDir} 0700 root root -" ];

    # The checks travel in the system closure (docs/agent.md, "Health checks").
    environment.etc = lib.mkIf (cfg.healthChecks != { }) (lib.mkMerge ([{
      "thymis/health-checks/deadline".text = toString cfg.healthCheckDeadline;
    }] ++ lib.mapAttrsToList (name: check: let kind = if check.required then "required.d" else "wanted.d"; in {
      "thymis/health-checks/${kind}/${name}".source = pkgs.writeShellScript "thymis-health-check-${name}" check.script;
      "thymis/health-checks/${kind}/${name}.timeout".text = toString check.timeout;
    }) cfg.healthChecks));
  };
}
