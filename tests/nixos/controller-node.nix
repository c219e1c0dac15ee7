# The controller node of the VM tests: this flake's module, listening for the devices
# on the test network.
{ self }:
{ ... }:
{
  imports = [ self.nixosModules.controller ];
  services.thymis-controller = {
    enable = true;
    listen = "0.0.0.0:8443";
    publicUrl = "wss://controller:8443";   # the controller's own certificate, which agents pin
    openFirewall = true;
  };
}
