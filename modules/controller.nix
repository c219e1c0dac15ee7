# services.thymis-controller: the Thymis controller as a systemd service (serving TLS
# with a certificate it generates, which agents and thymisctl pin), with an optional
# nginx reverse proxy in front that presents an ACME certificate.
{ config, lib, pkgs, utils, ... }:
let
  cfg = config.services.thymis-controller;
  port = lib.toInt (lib.last (lib.splitString ":" cfg.listen));
  host = lib.removeSuffix ":${toString port}" cfg.listen;
  loopback = lib.hasPrefix "127." host || host == "[::1]" || host == "localhost";
  plain = cfg.settings.insecure-plain-http or false;
  publicUrl = if cfg.publicUrl != null then cfg.publicUrl
    else if cfg.nginx.enable then "wss://${cfg.nginx.hostName}" else null;
  underVarLib = lib.hasPrefix "/var/lib/" cfg.stateDir;
  # The database's host, when it is a PostgreSQL URL (a local socket's is empty or "%2F...").
  dbHost = let m = if cfg.database == null then null
    else builtins.match "postgres(ql)?://([^@/]*@)?(\\[[^]]*]|[^/:?]*).*" cfg.database;
    in if m == null then null else builtins.elemAt m 2;
  dbRemote = dbHost != null && dbHost != "" && !(lib.hasPrefix "%2F" dbHost || lib.hasPrefix "%2f" dbHost)
    && dbHost != "localhost" && !(lib.hasPrefix "127." dbHost) && dbHost != "[::1]";
  # A flag set to true is given alone, false not at all; other values follow their flag.
  flag = k: v: if v == true then [ "--${k}" ] else if v == false then [ ] else [ "--${k}" (toString v) ];
  args = [
    "--state-dir" cfg.stateDir
    "--listen" cfg.listen
  ] ++ lib.optionals (publicUrl != null) [ "--public-url" publicUrl ]
  # The database goes in the environment (THYMIS_DATABASE), not the command line: a
  # command-line flag would override the environment file's URL with its password.
  # Behind nginx, agents check its ACME certificate with the device's CA bundle.
  ++ lib.optionals (cfg.nginx.enable && !(cfg.settings ? agent-ca-file)) [ "--agent-ca-file" "/etc/ssl/certs/ca-certificates.crt" ]
  ++ lib.concatMap (p: [ "--trusted-proxy" p ]) cfg.trustedProxies
  ++ lib.concatLists (lib.mapAttrsToList (name: ref: [ "--override-input" "${name}=${ref}" ]) cfg.overrideInputs)
  ++ lib.concatLists (lib.mapAttrsToList flag cfg.settings);
in
{
  options.services.thymis-controller = {
    enable = lib.mkEnableOption "the Thymis controller";

    package = lib.mkPackageOption pkgs "thymis" {
      extraDescription = "It provides bin/thymis-controller, wrapped with nix, git, e2fsprogs, dosfstools and mtools (the flake's module and its overlay set it).";
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
      description = "The URL agents use (written into generated agent configurations); with nginx, wss://HOSTNAME by default.";
    };

    database = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "postgres://thymis@db.example/thymis?sslmode=verify-full&sslrootcert=/etc/db-ca.pem";
      description = "null: SQLite in stateDir. A PostgreSQL URL, which controllers serving one fleet share (docs/scale.md); without its password, which goes in environmentFile as THYMIS_DATABASE (that variable then replaces this option).";
    };

    environmentFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/thymis-controller.env";
      description = "A file of environment variables for the controller, kept out of the Nix store, e.g. THYMIS_DATABASE=postgres://thymis:PASSWORD@db.example/thymis.";
    };

    settings = lib.mkOption {
      type = lib.types.attrsOf (lib.types.oneOf [ lib.types.bool lib.types.int lib.types.str ]);
      default = { };
      example = { confirm-timeout = 120; parallel = 20; };
      description = "Further command-line flags of thymis-controller (without the leading --); `true` gives a flag alone, `false` leaves it out.";
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

    trustedProxies = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = lib.optionals cfg.nginx.enable [ "127.0.0.1" "::1" ];
      defaultText = lib.literalExpression ''lib.optionals config.services.thymis-controller.nginx.enable [ "127.0.0.1" "::1" ]'';
      example = [ "10.0.0.0/8" ];
      description = "Reverse proxies (addresses or blocks) whose X-Forwarded-For header names the client, so that the controller's per-address limits count clients, not the proxy. nginx on this machine (nginx.enable) is trusted by default.";
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
    assertions = [{
      assertion = !(cfg.openFirewall && loopback && !cfg.nginx.enable);
      message = "services.thymis-controller.openFirewall opens port ${toString port}, but the controller listens on ${cfg.listen} only; set listen (e.g. \"0.0.0.0:${toString port}\") or nginx.enable.";
    } {
      assertion = !dbRemote || (lib.hasInfix "sslmode=verify-full" cfg.database && lib.hasInfix "sslrootcert=" cfg.database);
      message = "services.thymis-controller.database reaches ${toString dbHost} over the network: add ?sslmode=verify-full&sslrootcert=/path/to/the-servers-ca.pem (the controller refuses a remote PostgreSQL server without verified TLS).";
    }];

    nix.settings.experimental-features = [ "nix-command" "flakes" ];

    systemd.services.thymis-controller = {
      description = "Thymis controller";
      after = [ "network-online.target" "nix-daemon.socket" ] ++ lib.optional (config.services.postgresql.enable or false) "postgresql.service";
      wants = [ "network-online.target" ];
      wantedBy = [ "multi-user.target" ];
      # environmentFile's THYMIS_DATABASE (with the password) overrides this one.
      environment = lib.optionalAttrs (cfg.database != null) { THYMIS_DATABASE = cfg.database; };
      serviceConfig = {
        ExecStart = utils.escapeSystemdExecArgs ([ "${cfg.package}/bin/thymis-controller" ] ++ args);
        Restart = "always";
        RestartSec = 5;
        StateDirectory = lib.mkIf underVarLib (lib.removePrefix "/var/lib/" cfg.stateDir);
        StateDirectoryMode = "0700";
        UMask = "0077";
        # A fleet's connections need more than systemd's 1024 open files.
        LimitNOFILE = 65536;
        EnvironmentFile = lib.mkIf (cfg.environmentFile != null) cfg.environmentFile;
      };
    };

    services.nginx = lib.mkIf cfg.nginx.enable {
      enable = true;
      recommendedProxySettings = true;
      virtualHosts.${cfg.nginx.hostName} = {
        forceSSL = true;
        enableACME = true;
        locations."/" = {
          # The controller serves its own certificate (nginx does not check it: it
          # stands on the same machine), or plain HTTP with insecure-plain-http.
          proxyPass = "${if plain then "http" else "https"}://${cfg.listen}";
          proxyWebsockets = true;
        };
      };
    };

    systemd.tmpfiles.rules = lib.optionals (!underVarLib) [ "d ${cfg.stateDir} 0700 root root -" ];

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall (if cfg.nginx.enable then [ 80 443 ] else [ port ]);
  };
}
