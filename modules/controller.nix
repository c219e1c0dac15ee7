# services.thymis-controller: the Thymis controller as a systemd service, with an
# optional nginx reverse proxy terminating TLS.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.thymis-controller;
  port = lib.toInt (lib.last (lib.splitString ":" cfg.listen));
  args = [
    "--state-dir" cfg.stateDir
    "--listen" cfg.listen
  ] ++ lib.optionals (cfg.publicUrl != null) [ "--public-url" cfg.publicUrl ]
  ++ lib.concatLists (lib.mapAttrsToList (name: ref: [ "--override-input" "${name}=${ref}" ]) cfg.overrideInputs)
  ++ lib.concatLists (lib.mapAttrsToList (k: v: [ "--${k}" (toString v) ]) cfg.settings);
in
{
  options.services.thymis-controller = {
    enable = lib.mkEnableOption "the Thymis controller";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The package providing bin/thymis-controller (wrapped with nix, git, e2fsprogs, dosfstools, mtools).";
    };

    stateDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/thymis";
      description = "Project repository, database, keys and admin token (created on first start).";
    };

    listen = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1:8443";
    };

    publicUrl = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "wss://thymis.example.org";
      description = "The URL agents use (written into generated agent configurations).";
    };

    settings = lib.mkOption {
      type = lib.types.attrsOf (lib.types.oneOf [ lib.types.str lib.types.int ]);
      default = { };
      example = { confirm-timeout = 120; parallel = 20; };
      description = "Further command-line flags of thymis-controller (without the leading --).";
    };

    overrideInputs = lib.mkOption {
      type = lib.types.attrsOf lib.types.str;
      default = { };
      example = { nixpkgs = "path:/srv/nixpkgs"; };
      description = "Flake inputs of the project to override in every build (e.g. for a controller without network).";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the listen port (or 443 with nginx) in the firewall.";
    };

    nginx = {
      enable = lib.mkEnableOption "an nginx reverse proxy with TLS (ACME) in front of the controller";
      hostName = lib.mkOption {
        type = lib.types.str;
        example = "thymis.example.org";
      };
    };
  };

  config = lib.mkIf cfg.enable {
    nix.settings.experimental-features = [ "nix-command" "flakes" ];

    systemd.services.thymis-controller = {
      description = "Thymis controller";
      after = [ "network-online.target" "nix-daemon.socket" ];
      wants = [ "network-online.target" ];
      wantedBy = [ "multi-user.target" ];
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/thymis-controller ${lib.escapeShellArgs args}";
        Restart = "always";
        RestartSec = 5;
        StateDirectory = lib.mkIf (lib.hasPrefix "/var/lib/" cfg.stateDir) (lib.removePrefix "/var/lib/" cfg.stateDir);
        StateDirectoryMode = "0700";
        UMask = "0077";
      };
    };

    services.nginx = lib.mkIf cfg.nginx.enable {
      enable = true;
      recommendedProxySettings = true;
      virtualHosts.${cfg.nginx.hostName} = {
        forceSSL = true;
        enableACME = true;
        locations."/" = {
          proxyPass = "http://${cfg.listen}";
          proxyWebsockets = true;
        };
      };
    };

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall (if cfg.nginx.enable then [ 80 443 ] else [ port ]);
  };
}
