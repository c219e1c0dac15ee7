{
  description = "Thymis fleet project";

  # No inputs: this starter builds offline, without nixpkgs. docs/project.md shows how
  # to add a nixpkgs input and real NixOS configurations.
  outputs = { self }:
    let
      # PLACEHOLDER, NOT NixOS: a stand-in system whose switch-to-configuration only
      # says what it would do, so that the whole deploy loop can run before you add a
      # real configuration. Replace it with nixpkgs.lib.nixosSystem { ... }.
      placeholder = name: derivation {
        inherit name;
        system = "x86_64-linux";
        builder = "/bin/sh";
        args = [ "-c" ''
          mkdir -p $out/bin
          cat > $out/bin/switch-to-configuration <<EOS
          #!/bin/sh
          echo "placeholder system ${name}: \$1 (nothing to activate)"
          EOS
          chmod +x $out/bin/switch-to-configuration
          echo "${name}" > $out/thymis-placeholder
        '' ];
        PATH = "/usr/bin:/bin";
      };
    in
    {
      nixosConfigurations.kiosk.config.system.build.toplevel = placeholder "kiosk";
    };
}
