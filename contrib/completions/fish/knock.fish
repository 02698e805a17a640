# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_knock_global_optspecs
    string join \n config= server= key-id= key-file= server-id= ttl= source= discover= service= dry-run save-packet= sequence print-sequence sequence-ports= sequence-length= sequence-protocol= sequence-step= wait wait-port= timeout= h/help V/version
end

function __fish_knock_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_knock_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_knock_using_subcommand
    set -l cmd (__fish_knock_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c knock -n "__fish_knock_needs_command" -l config -d 'Client config file [default: ~/.config/knock/config.toml]' -r -F
complete -c knock -n "__fish_knock_needs_command" -l server -d 'Server to knock without a config entry: ADDR or ADDR:PORT ([v6]:PORT)' -r
complete -c knock -n "__fish_knock_needs_command" -l key-id -d 'Key id (with --server)' -r
complete -c knock -n "__fish_knock_needs_command" -l key-file -d 'Key file (with --server)' -r -F
complete -c knock -n "__fish_knock_needs_command" -l server-id -d 'The server\'s id (its knock.server_id) [default: the server name as given]' -r
complete -c knock -n "__fish_knock_needs_command" -l ttl -d 'Grant length to ask for, like 30m [default: the server\'s]' -r
complete -c knock -n "__fish_knock_needs_command" -l source -d 'Address the knock is bound to: `auto` (the route\'s source, or --discover\'s answer behind a NAT), an IP, or `packet` (unbound: the key must allow it) [default: auto]' -r
complete -c knock -n "__fish_knock_needs_command" -l discover -d 'How to learn the public address behind a NAT: `dns:NAME@RESOLVER` or an https:// URL' -r
complete -c knock -n "__fish_knock_needs_command" -l service -d 'Service to open, like ssh, wireguard or egress; repeat for several (one knock each) [default: the host\'s `services`, or ssh]' -r
complete -c knock -n "__fish_knock_needs_command" -l save-packet -d 'Write the knock(s) to a new FILE (mode 0600) instead of sending them: one line each, `ADDR:PORT SERVICE HEX` — to debug, or to send from elsewhere within the server\'s clock skew (30 s by default)' -r -F
complete -c knock -n "__fish_knock_needs_command" -l sequence-ports -d 'The server\'s `sequence.ports` [default: the host\'s, or 30000-60999]' -r
complete -c knock -n "__fish_knock_needs_command" -l sequence-length -d 'The server\'s `sequence.length` [default: the host\'s, or 4]' -r
complete -c knock -n "__fish_knock_needs_command" -l sequence-protocol -d 'The server\'s `sequence.protocol`: tcp, udp or mixed [default: the host\'s, or tcp]' -r
complete -c knock -n "__fish_knock_needs_command" -l sequence-step -d 'The server\'s `sequence.step` [default: the host\'s, or 30s]' -r
complete -c knock -n "__fish_knock_needs_command" -l wait-port -d 'Port to poll with --wait [default: the host\'s ssh_port, or 22, when ssh is among the services]' -r
complete -c knock -n "__fish_knock_needs_command" -l timeout -d 'Longest wait for the port to open' -r
complete -c knock -n "__fish_knock_needs_command" -l dry-run -d 'Build the knock(s) and print what would be sent where; send nothing'
complete -c knock -n "__fish_knock_needs_command" -l sequence -d 'Touch the key\'s current port sequence instead of sending a knock (for a key with `sequence = true` on the server): TCP SYNs or UDP datagrams, nothing else'
complete -c knock -n "__fish_knock_needs_command" -l print-sequence -d 'Print the key\'s current port sequence the way knockd\'s `knock` client takes it (`HOST PORT[:udp] …`), and how long it stays valid; send nothing'
complete -c knock -n "__fish_knock_needs_command" -l wait -d 'After knocking, poll the opened port until it answers'
complete -c knock -n "__fish_knock_needs_command" -s h -l help -d 'Print help'
complete -c knock -n "__fish_knock_needs_command" -s V -l version -d 'Print version'
complete -c knock -n "__fish_knock_needs_command" -a "proxy" -d 'Knock, wait for PORT to open, then relay stdin/stdout to it (for ssh\'s ProxyCommand)'
complete -c knock -n "__fish_knock_needs_command" -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c knock -n "__fish_knock_using_subcommand proxy" -l config -d 'Client config file [default: ~/.config/knock/config.toml]' -r -F
complete -c knock -n "__fish_knock_using_subcommand proxy" -l server-id -d 'The server\'s id (its knock.server_id) [default: the server name as given]' -r
complete -c knock -n "__fish_knock_using_subcommand proxy" -l ttl -d 'Grant length to ask for, like 30m [default: the server\'s]' -r
complete -c knock -n "__fish_knock_using_subcommand proxy" -l source -d 'Address the knock is bound to: `auto` (the route\'s source, or --discover\'s answer behind a NAT), an IP, or `packet` (unbound: the key must allow it) [default: auto]' -r
complete -c knock -n "__fish_knock_using_subcommand proxy" -l discover -d 'How to learn the public address behind a NAT: `dns:NAME@RESOLVER` or an https:// URL' -r
complete -c knock -n "__fish_knock_using_subcommand proxy" -l service -d 'Service to open, like ssh, wireguard or egress; repeat for several (one knock each) [default: the host\'s `services`, or ssh]' -r
complete -c knock -n "__fish_knock_using_subcommand proxy" -l sequence-ports -d 'The server\'s `sequence.ports` [default: the host\'s, or 30000-60999]' -r
complete -c knock -n "__fish_knock_using_subcommand proxy" -l sequence-length -d 'The server\'s `sequence.length` [default: the host\'s, or 4]' -r
complete -c knock -n "__fish_knock_using_subcommand proxy" -l sequence-protocol -d 'The server\'s `sequence.protocol`: tcp, udp or mixed [default: the host\'s, or tcp]' -r
complete -c knock -n "__fish_knock_using_subcommand proxy" -l sequence-step -d 'The server\'s `sequence.step` [default: the host\'s, or 30s]' -r
complete -c knock -n "__fish_knock_using_subcommand proxy" -l wait-port -d 'Port to poll with --wait [default: the host\'s ssh_port, or 22, when ssh is among the services]' -r
complete -c knock -n "__fish_knock_using_subcommand proxy" -l timeout -d 'Longest wait for the port to open' -r
complete -c knock -n "__fish_knock_using_subcommand proxy" -s h -l help -d 'Print help'
complete -c knock -n "__fish_knock_using_subcommand help; and not __fish_seen_subcommand_from proxy help" -f -a "proxy" -d 'Knock, wait for PORT to open, then relay stdin/stdout to it (for ssh\'s ProxyCommand)'
complete -c knock -n "__fish_knock_using_subcommand help; and not __fish_seen_subcommand_from proxy help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
