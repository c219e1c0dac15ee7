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
  dbusPolicy = pkgs.writeTextDir "share/dbus-1/system.d/io.thymis.Agent1.conf"
    (builtins.readFile ../daemon/dbus/io.thymis.Agent1.conf);
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

    services.dbus.packages = [ dbusPolicy ];

    systemd.services.thymis-agent = {
      inherit (unit) description after wants wantedBy restartIfChanged;
      path = [ config.nix.package config.systemd.package pkgs.util-linux ];
      serviceConfig = removeAttrs unit.serviceConfig [ "StateDirectory" ] // {
        ExecStart = utils.escapeSystemdExecArgs [ "${cfg.package}/bin/thymis-agent" "--config" configPath ];
      } // lib.optionalAttrs underVarLib {
        StateDirectory = lib.removePrefix "/var/lib/" stateDir;
      };
    };

    systemd.tmpfiles.rules = lib.optionals (!underVarLib) [ "d ${stateDir} 0700 root root -" ];
  };
}
