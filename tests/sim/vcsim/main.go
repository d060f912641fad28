// Command vcsim serves govmomi's in-memory vCenter simulator for OMA's tests.
//
// It is a small main of our own around the packaged govmomi `simulator` library (Debian's
// golang-github-vmware-govmomi-dev ships the library but not its vcsim command). It builds the
// simulator.VPX() inventory (datacenter DC0, cluster DC0_C0 with three hosts, standalone host DC0_H0,
// datastore LocalDS_0, networks "VM Network" and DC0_DVPG0), then creates through CreateVM_Task the
// model's four VMs (unless -default-vms=false) and every -vm, with vCenter-like device keys, labels
// and MACs. It serves the SOAP SDK with TLS on 127.0.0.1:-port (0 picks a free port), accepts only
// -username/-password at Login, prints one JSON line {"url", "username", "password"} on stdout once
// it is ready, and exits 0 on SIGTERM or SIGINT after removing its datastore directories (made
// under $TMPDIR). Build it offline in GOPATH mode, as tests/sim/vcenter.py does (into
// <repo>/.cache/vcsim/ or $OMA_CACHE_DIR/vcsim/):
//
//	GO111MODULE=off GOPATH=<cache>/gopath:/usr/share/gocode go build -o <cache>/vcsim/vcsim .
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// Names from simulator.VPX(); -vm machines go to the cluster's root pool.
const (
	datacenterPath = "/DC0"
	clusterPool    = "/DC0/host/DC0_C0/Resources"
	hostPool       = "/DC0/host/DC0_H0/Resources"
	datastoreName  = "LocalDS_0"
)

// NIC i of a VM is attached to nicNetworks[i%2] with adapter nicAdapters[i%3], so a VM with a few
// NICs covers both backing kinds (standard and distributed) and the common adapters.
var (
	nicNetworks = []string{"VM Network", "DC0_DVPG0"}
	nicAdapters = []string{"vmxnet3", "e1000e", "e1000"}
)

// Device keys as vCenter numbers them (the contract's disk ids are "disk-<key>", from 2000); the
// simulator keeps positive keys from the spec but invents random ones for unset keys.
const (
	scsiKey = 1000
	diskKey = 2000
	nicKey  = 4000
)

// vmSpec describes one extra VM; zero values take the defaults noted on each field.
type vmSpec struct {
	Name         string `json:"name"`         // required; '/', '\' and stray '%' are escaped as vCenter does
	Disks        *int   `json:"disks"`        // number of disks on one pvscsi controller, default 1, at most 15
	DiskGB       int64  `json:"disk_gb"`      // size of every disk, default 1 (the backing files stay empty)
	NICs         *int   `json:"nics"`         // number of NICs, default 1
	CPUs         int32  `json:"cpus"`         // default 1
	MemoryMB     int64  `json:"memory_mb"`    // default 1024
	GuestID      string `json:"guest_id"`     // default otherLinux64Guest
	Provisioning string `json:"provisioning"` // thin (default), thick or eagerZeroedThick
	PowerOn      bool   `json:"power_on"`     // default powered off

	pool string // inventory path of the resource pool; clusterPool when empty
}

// vmSpecs collects repeated -vm flags.
type vmSpecs []vmSpec

func (v *vmSpecs) String() string { return fmt.Sprintf("%d VMs", len(*v)) }

func (v *vmSpecs) Set(value string) error {
	dec := json.NewDecoder(strings.NewReader(value))
	dec.DisallowUnknownFields()
	var spec vmSpec
	if err := dec.Decode(&spec); err != nil {
		return err
	}
	if spec.Name == "" {
		return errors.New("a VM needs a name")
	}
	if spec.Disks == nil {
		spec.Disks = intPtr(1)
	}
	if spec.NICs == nil {
		spec.NICs = intPtr(1)
	}
	if *spec.Disks < 0 || *spec.Disks > 15 || *spec.NICs < 0 {
		return errors.New("disks must be 0..15 and nics >= 0")
	}
	switch spec.Provisioning {
	case "":
		spec.Provisioning = "thin"
	case "thin", "thick", "eagerZeroedThick":
	default:
		return fmt.Errorf("unknown provisioning %q", spec.Provisioning)
	}
	if spec.DiskGB <= 0 {
		spec.DiskGB = 1
	}
	if spec.CPUs <= 0 {
		spec.CPUs = 1
	}
	if spec.MemoryMB <= 0 {
		spec.MemoryMB = 1024
	}
	if spec.GuestID == "" {
		spec.GuestID = string(types.VirtualMachineGuestOsIdentifierOtherLinux64Guest)
	}
	*v = append(*v, spec)
	return nil
}

func intPtr(i int) *int { return &i }

// defaultVMs mirror the four VMs simulator.VPX() would create, built by addVMs instead so that
// their device keys, labels and MACs look like vCenter's.
func defaultVMs() vmSpecs {
	var vms vmSpecs
	for _, place := range []struct{ prefix, pool string }{
		{"DC0_H0_VM", hostPool}, {"DC0_C0_RP0_VM", clusterPool},
	} {
		for i := 0; i < 2; i++ {
			spec := fmt.Sprintf(`{"name": "%s%d", "guest_id": "otherGuest", "power_on": true}`, place.prefix, i)
			_ = vms.Set(spec)
			vms[len(vms)-1].pool = place.pool
		}
	}
	return vms
}

func main() {
	port := flag.Int("port", 0, "TCP port on 127.0.0.1; 0 picks a free one")
	username := flag.String("username", "administrator@vsphere.local", "the only user Login accepts")
	password := flag.String("password", "vcsim", "that user's password")
	withDefaults := flag.Bool("default-vms", true, "create the VPX model's four VMs (DC0_H0_VM0 ...)")
	certFile := flag.String("cert", "", "PEM certificate (chain) to serve; empty = Go's self-signed test certificate")
	keyFile := flag.String("key", "", "PEM private key of -cert")
	var vms vmSpecs
	flag.Var(&vms, "vm", `extra VM as JSON, repeatable: {"name", "disks", "disk_gb", "nics", "cpus", `+
		`"memory_mb", "guest_id", "provisioning", "power_on"}`)
	flag.Parse()
	log.SetPrefix("vcsim: ")

	if *withDefaults {
		vms = append(defaultVMs(), vms...)
	}
	if err := run(*port, *username, *password, *certFile, *keyFile, vms); err != nil {
		log.Fatal(err)
	}
}

func run(port int, username, password, certFile, keyFile string, vms vmSpecs) error {
	if username == "" || password == "" {
		return errors.New("-username and -password must not be empty")
	}
	tlsConfig := new(tls.Config)
	if certFile != "" || keyFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return fmt.Errorf("-cert/-key: %w", err)
		}
		tlsConfig.Certificates = []tls.Certificate{cert}
	}

	model := simulator.VPX()
	model.Machine = 0 // addVMs builds them, with realistic device keys
	if err := model.Create(); err != nil {
		return fmt.Errorf("create model: %w", err)
	}
	defer model.Remove()

	// With Listen.User set (and not simulator.DefaultLogin), SessionManager.Login accepts only
	// this user and password and answers anything else with InvalidLogin.
	model.Service.TLS = tlsConfig
	model.Service.Listen = &url.URL{
		Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		User: url.UserPassword(username, password),
	}
	server, err := newServer(model.Service)
	if err != nil {
		return err
	}
	defer server.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	if err := addVMs(ctx, server.URL, vms); err != nil {
		return err
	}

	// Readiness: the port is bound and the inventory is complete.
	public := *server.URL
	public.User = nil
	line, err := json.Marshal(map[string]string{
		"url": public.String(), "username": username, "password": password,
	})
	if err != nil {
		return err
	}
	fmt.Println(string(line))

	<-ctx.Done()
	log.Print("stopping")
	return nil
}

// newServer binds and starts the SDK server; the simulator panics when it cannot listen.
func newServer(svc *simulator.Service) (server *simulator.Server, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("listen on %s: %v", svc.Listen.Host, r)
		}
	}()
	return svc.NewServer(), nil
}

// addVMs creates the VMs through the SOAP API with CreateVM_Task, as a vCenter client would.
func addVMs(ctx context.Context, u *url.URL, vms vmSpecs) error {
	if len(vms) == 0 {
		return nil
	}
	client, err := govmomi.NewClient(ctx, u, true)
	if err != nil {
		return fmt.Errorf("connect to self: %w", err)
	}
	defer func() { _ = client.Logout(context.Background()) }()

	finder := find.NewFinder(client.Client, false)
	dc, err := finder.Datacenter(ctx, datacenterPath)
	if err != nil {
		return err
	}
	finder.SetDatacenter(dc)
	folders, err := dc.Folders(ctx)
	if err != nil {
		return err
	}
	ds, err := finder.Datastore(ctx, datastoreName)
	if err != nil {
		return err
	}
	var backings []types.BaseVirtualDeviceBackingInfo
	for _, name := range nicNetworks {
		network, err := finder.Network(ctx, name)
		if err != nil {
			return err
		}
		backing, err := network.EthernetCardBackingInfo(ctx)
		if err != nil {
			return err
		}
		backings = append(backings, backing)
	}

	for index, spec := range vms {
		if err := addVM(ctx, client, finder, folders.VmFolder, index, spec, ds.Reference(), backings); err != nil {
			return fmt.Errorf("VM %q: %w", spec.Name, err)
		}
	}
	return nil
}

func addVM(ctx context.Context, client *govmomi.Client, finder *find.Finder, folder *object.Folder, index int,
	spec vmSpec, ds types.ManagedObjectReference, backings []types.BaseVirtualDeviceBackingInfo) error {
	if spec.pool == "" {
		spec.pool = clusterPool
	}
	pool, err := finder.ResourcePool(ctx, spec.pool)
	if err != nil {
		return err
	}
	config, err := vmConfig(spec, index, ds, backings)
	if err != nil {
		return err
	}
	task, err := folder.CreateVM(ctx, config, pool, nil)
	if err != nil {
		return err
	}
	info, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return err
	}
	if !spec.PowerOn {
		return nil
	}
	vm := object.NewVirtualMachine(client.Client, info.Result.(types.ManagedObjectReference))
	task, err = vm.PowerOn(ctx)
	if err != nil {
		return err
	}
	return task.Wait(ctx)
}

// vmConfig builds the CreateVM_Task spec: one pvscsi controller with the disks, then the NICs,
// keyed, labelled and addressed the way vCenter does it.
func vmConfig(spec vmSpec, index int, ds types.ManagedObjectReference,
	backings []types.BaseVirtualDeviceBackingInfo) (types.VirtualMachineConfigSpec, error) {
	config := types.VirtualMachineConfigSpec{
		Name:     escapeName(spec.Name),
		GuestId:  spec.GuestID,
		NumCPUs:  spec.CPUs,
		MemoryMB: spec.MemoryMB,
		Files:    &types.VirtualMachineFileInfo{VmPathName: "[" + datastoreName + "]"},
	}

	var devices object.VirtualDeviceList
	scsi, err := devices.CreateSCSIController("pvscsi")
	if err != nil {
		return config, err
	}
	scsi.GetVirtualDevice().Key = scsiKey
	scsi.GetVirtualDevice().DeviceInfo = &types.Description{Label: "SCSI controller 0", Summary: "VMware paravirtual SCSI"}
	devices = append(devices, scsi)

	for i := 0; i < *spec.Disks; i++ {
		// vSphere's naming: [ds] <vm>/<vm>.vmdk, [ds] <vm>/<vm>_1.vmdk, ...
		file := config.Name
		if i > 0 {
			file = fmt.Sprintf("%s_%d", config.Name, i)
		}
		disk := devices.CreateDisk(scsi.(types.BaseVirtualController), ds,
			fmt.Sprintf("[%s] %s/%s.vmdk", datastoreName, config.Name, file))
		disk.Key = diskKey + *disk.UnitNumber
		disk.DeviceInfo = &types.Description{Label: fmt.Sprintf("Hard disk %d", i+1)}
		disk.CapacityInKB = spec.DiskGB * 1024 * 1024
		backing := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		backing.ThinProvisioned = types.NewBool(spec.Provisioning == "thin")
		backing.EagerlyScrub = types.NewBool(spec.Provisioning == "eagerZeroedThick")
		devices = append(devices, disk)
	}

	for i := 0; i < *spec.NICs; i++ {
		nic, err := devices.CreateEthernetCard(nicAdapters[i%len(nicAdapters)], backings[i%len(backings)])
		if err != nil {
			return config, err
		}
		card := nic.(types.BaseVirtualEthernetCard).GetVirtualEthernetCard()
		card.Key = nicKey + int32(i)
		card.DeviceInfo = &types.Description{Label: fmt.Sprintf("Network adapter %d", i+1)}
		// VMware's static range 00:50:56:00:00:00-00:50:56:3f:ff:ff; the simulator's own
		// generator gives two VMs the same MAC.
		card.AddressType = string(types.VirtualEthernetCardMacTypeAssigned)
		card.MacAddress = fmt.Sprintf("00:50:56:%02x:%02x:%02x", (index>>8)&0x3f, index&0xff, i&0xff)
		devices = append(devices, nic)
	}

	config.DeviceChange, err = devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
	return config, err
}

// escapeName escapes an entity name the way vCenter stores it (see ManagedEntity.name): '/' as
// %2f, '\' as %5c, and '%' as %25 unless it already starts an escape sequence. The simulator
// keeps names verbatim, and an unescaped '/' would also split the VM's datastore directory.
func escapeName(name string) string {
	var b strings.Builder
	for i, r := range name {
		switch {
		case r == '/':
			b.WriteString("%2f")
		case r == '\\':
			b.WriteString("%5c")
		case r == '%' && !(i+2 < len(name) && isHex(name[i+1]) && isHex(name[i+2])):
			b.WriteString("%25")
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

func isHex(c byte) bool {
	return ('0' <= c && c <= '9') || ('a' <= c && c <= 'f') || ('A' <= c && c <= 'F')
}
