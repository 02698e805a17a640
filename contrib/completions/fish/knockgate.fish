# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_knockgate_global_optspecs
    string join \n config= socket= h/help V/version
end

function __fish_knockgate_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_knockgate_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_knockgate_using_subcommand
    set -l cmd (__fish_knockgate_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c knockgate -n "__fish_knockgate_needs_command" -l config -d 'Config file (ruleset, check, keygen; and where the admin socket is) [default: /etc/knockgate/knockgate.toml]' -r -F
complete -c knockgate -n "__fish_knockgate_needs_command" -l socket -d 'The daemon\'s admin socket [default: the config\'s `admin.socket`, else /run/knockgate/admin.sock]' -r -F
complete -c knockgate -n "__fish_knockgate_needs_command" -s h -l help -d 'Print help'
complete -c knockgate -n "__fish_knockgate_needs_command" -s V -l version -d 'Print version'
complete -c knockgate -n "__fish_knockgate_needs_command" -f -a "status" -d 'The daemon\'s state in brief'
complete -c knockgate -n "__fish_knockgate_needs_command" -f -a "grants" -d 'List the open grants'
complete -c knockgate -n "__fish_knockgate_needs_command" -f -a "open" -d 'Open a service (ssh, or one of the config\'s [[services]]) for one source address'
complete -c knockgate -n "__fish_knockgate_needs_command" -f -a "reload" -d 'Re-read the config and apply it, keeping grants and windows (exit 2 if it is bad)'
complete -c knockgate -n "__fish_knockgate_needs_command" -f -a "apply" -d 'Apply --config in memory; roll back unless `knockgate confirm` comes within --confirm'
complete -c knockgate -n "__fish_knockgate_needs_command" -f -a "confirm" -d 'Keep the config applied with `apply --confirm` (saved over the daemon\'s config file)'
complete -c knockgate -n "__fish_knockgate_needs_command" -f -a "revoke" -d 'Close a grant now'
complete -c knockgate -n "__fish_knockgate_needs_command" -f -a "keygen" -d 'Create a knock key: writes DIR/ID.key (mode 0600) and prints the config to add'
complete -c knockgate -n "__fish_knockgate_needs_command" -f -a "import-fwknop" -d 'Translate fwknopd\'s access.conf into [[fwknop_keys]] (and [[services]]) stanzas; prints them, naming what cannot be carried over'
complete -c knockgate -n "__fish_knockgate_needs_command" -f -a "ruleset" -d 'Print the nft ruleset the config produces (changes nothing)'
complete -c knockgate -n "__fish_knockgate_needs_command" -f -a "check" -d 'Validate the config and its key files; exit 2 naming the file and key at fault'
complete -c knockgate -n "__fish_knockgate_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c knockgate -n "__fish_knockgate_using_subcommand status" -l config -d 'Config file (ruleset, check, keygen; and where the admin socket is) [default: /etc/knockgate/knockgate.toml]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand status" -l socket -d 'The daemon\'s admin socket [default: the config\'s `admin.socket`, else /run/knockgate/admin.sock]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand status" -s h -l help -d 'Print help'
complete -c knockgate -n "__fish_knockgate_using_subcommand grants" -l config -d 'Config file (ruleset, check, keygen; and where the admin socket is) [default: /etc/knockgate/knockgate.toml]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand grants" -l socket -d 'The daemon\'s admin socket [default: the config\'s `admin.socket`, else /run/knockgate/admin.sock]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand grants" -l json -d 'Print JSON instead of a table'
complete -c knockgate -n "__fish_knockgate_using_subcommand grants" -s h -l help -d 'Print help'
complete -c knockgate -n "__fish_knockgate_using_subcommand open" -l from -d 'The source address' -r
complete -c knockgate -n "__fish_knockgate_using_subcommand open" -l ttl -d 'How long, like 30m [default: the server\'s default; capped at its maximum]' -r
complete -c knockgate -n "__fish_knockgate_using_subcommand open" -l config -d 'Config file (ruleset, check, keygen; and where the admin socket is) [default: /etc/knockgate/knockgate.toml]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand open" -l socket -d 'The daemon\'s admin socket [default: the config\'s `admin.socket`, else /run/knockgate/admin.sock]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand open" -s h -l help -d 'Print help'
complete -c knockgate -n "__fish_knockgate_using_subcommand reload" -l config -d 'Config file (ruleset, check, keygen; and where the admin socket is) [default: /etc/knockgate/knockgate.toml]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand reload" -l socket -d 'The daemon\'s admin socket [default: the config\'s `admin.socket`, else /run/knockgate/admin.sock]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand reload" -s h -l help -d 'Print help'
complete -c knockgate -n "__fish_knockgate_using_subcommand apply" -l confirm -d 'Time to confirm, like 2m' -r
complete -c knockgate -n "__fish_knockgate_using_subcommand apply" -l config -d 'Config file (ruleset, check, keygen; and where the admin socket is) [default: /etc/knockgate/knockgate.toml]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand apply" -l socket -d 'The daemon\'s admin socket [default: the config\'s `admin.socket`, else /run/knockgate/admin.sock]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand apply" -s h -l help -d 'Print help'
complete -c knockgate -n "__fish_knockgate_using_subcommand confirm" -l config -d 'Config file (ruleset, check, keygen; and where the admin socket is) [default: /etc/knockgate/knockgate.toml]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand confirm" -l socket -d 'The daemon\'s admin socket [default: the config\'s `admin.socket`, else /run/knockgate/admin.sock]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand confirm" -s h -l help -d 'Print help'
complete -c knockgate -n "__fish_knockgate_using_subcommand revoke" -l config -d 'Config file (ruleset, check, keygen; and where the admin socket is) [default: /etc/knockgate/knockgate.toml]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand revoke" -l socket -d 'The daemon\'s admin socket [default: the config\'s `admin.socket`, else /run/knockgate/admin.sock]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand revoke" -s h -l help -d 'Print help'
complete -c knockgate -n "__fish_knockgate_using_subcommand keygen" -l dir -d 'Where to write the key file' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand keygen" -l address -d 'The name or address laptops reach this server by' -r
complete -c knockgate -n "__fish_knockgate_using_subcommand keygen" -l owner -d 'The user knockgated runs as, who must be able to read the key [default: knockgated, when that user exists]. The key file is handed to it (mode 0600 stays), which needs root' -r
complete -c knockgate -n "__fish_knockgate_using_subcommand keygen" -l config -d 'Config file (ruleset, check, keygen; and where the admin socket is) [default: /etc/knockgate/knockgate.toml]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand keygen" -l socket -d 'The daemon\'s admin socket [default: the config\'s `admin.socket`, else /run/knockgate/admin.sock]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand keygen" -l nat -d 'NAT mode: let this key\'s knocks name no address (the grant is then for the packet\'s source, and anyone who sees the knock can race it). Only for clients behind a NAT that cannot learn their public address'
complete -c knockgate -n "__fish_knockgate_using_subcommand keygen" -l sequence -d 'Also give this key a port sequence (`sequence = true`), for clients that can only touch ports: knockd\'s `knock`, phone apps, router scripts'
complete -c knockgate -n "__fish_knockgate_using_subcommand keygen" -s h -l help -d 'Print help'
complete -c knockgate -n "__fish_knockgate_using_subcommand import-fwknop" -l write-keys -d 'Also write each stanza\'s key file (mode 0600, never overwriting) into DIR, and point the stanzas there' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand import-fwknop" -l config -d 'Config file (ruleset, check, keygen; and where the admin socket is) [default: /etc/knockgate/knockgate.toml]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand import-fwknop" -l socket -d 'The daemon\'s admin socket [default: the config\'s `admin.socket`, else /run/knockgate/admin.sock]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand import-fwknop" -s h -l help -d 'Print help'
complete -c knockgate -n "__fish_knockgate_using_subcommand ruleset" -l config -d 'Config file (ruleset, check, keygen; and where the admin socket is) [default: /etc/knockgate/knockgate.toml]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand ruleset" -l socket -d 'The daemon\'s admin socket [default: the config\'s `admin.socket`, else /run/knockgate/admin.sock]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand ruleset" -s h -l help -d 'Print help'
complete -c knockgate -n "__fish_knockgate_using_subcommand check" -l config -d 'Config file (ruleset, check, keygen; and where the admin socket is) [default: /etc/knockgate/knockgate.toml]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand check" -l socket -d 'The daemon\'s admin socket [default: the config\'s `admin.socket`, else /run/knockgate/admin.sock]' -r -F
complete -c knockgate -n "__fish_knockgate_using_subcommand check" -s h -l help -d 'Print help'
complete -c knockgate -n "__fish_knockgate_using_subcommand help; and not __fish_seen_subcommand_from status grants open reload apply confirm revoke keygen import-fwknop ruleset check help" -f -a "status" -d 'The daemon\'s state in brief'
complete -c knockgate -n "__fish_knockgate_using_subcommand help; and not __fish_seen_subcommand_from status grants open reload apply confirm revoke keygen import-fwknop ruleset check help" -f -a "grants" -d 'List the open grants'
complete -c knockgate -n "__fish_knockgate_using_subcommand help; and not __fish_seen_subcommand_from status grants open reload apply confirm revoke keygen import-fwknop ruleset check help" -f -a "open" -d 'Open a service (ssh, or one of the config\'s [[services]]) for one source address'
complete -c knockgate -n "__fish_knockgate_using_subcommand help; and not __fish_seen_subcommand_from status grants open reload apply confirm revoke keygen import-fwknop ruleset check help" -f -a "reload" -d 'Re-read the config and apply it, keeping grants and windows (exit 2 if it is bad)'
complete -c knockgate -n "__fish_knockgate_using_subcommand help; and not __fish_seen_subcommand_from status grants open reload apply confirm revoke keygen import-fwknop ruleset check help" -f -a "apply" -d 'Apply --config in memory; roll back unless `knockgate confirm` comes within --confirm'
complete -c knockgate -n "__fish_knockgate_using_subcommand help; and not __fish_seen_subcommand_from status grants open reload apply confirm revoke keygen import-fwknop ruleset check help" -f -a "confirm" -d 'Keep the config applied with `apply --confirm` (saved over the daemon\'s config file)'
complete -c knockgate -n "__fish_knockgate_using_subcommand help; and not __fish_seen_subcommand_from status grants open reload apply confirm revoke keygen import-fwknop ruleset check help" -f -a "revoke" -d 'Close a grant now'
complete -c knockgate -n "__fish_knockgate_using_subcommand help; and not __fish_seen_subcommand_from status grants open reload apply confirm revoke keygen import-fwknop ruleset check help" -f -a "keygen" -d 'Create a knock key: writes DIR/ID.key (mode 0600) and prints the config to add'
complete -c knockgate -n "__fish_knockgate_using_subcommand help; and not __fish_seen_subcommand_from status grants open reload apply confirm revoke keygen import-fwknop ruleset check help" -f -a "import-fwknop" -d 'Translate fwknopd\'s access.conf into [[fwknop_keys]] (and [[services]]) stanzas; prints them, naming what cannot be carried over'
complete -c knockgate -n "__fish_knockgate_using_subcommand help; and not __fish_seen_subcommand_from status grants open reload apply confirm revoke keygen import-fwknop ruleset check help" -f -a "ruleset" -d 'Print the nft ruleset the config produces (changes nothing)'
complete -c knockgate -n "__fish_knockgate_using_subcommand help; and not __fish_seen_subcommand_from status grants open reload apply confirm revoke keygen import-fwknop ruleset check help" -f -a "check" -d 'Validate the config and its key files; exit 2 naming the file and key at fault'
complete -c knockgate -n "__fish_knockgate_using_subcommand help; and not __fish_seen_subcommand_from status grants open reload apply confirm revoke keygen import-fwknop ruleset check help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
